"""The trainer's optimiser and weight average ([train] optimizer, ema_decay): bitsandbytes'
8-bit AdamW really holds 8-bit moments and trains as fp32 AdamW does within a measured
tolerance; the EMA equals an fp64 average of the weights after each step and is the stage's
LoRA and paired gap; a stage killed with both resumes bitwise; the default settings train
bitwise what they trained before these keys existed, under the same identity; bad values are
one line naming the key, before any model loads."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    REPO,
    child_env,
    kill_when_paused,
    micro_recipe,
    run_recorded_before,
    start_ranks,
    wait_ranks,
)
from safetensors.torch import load_file

from artaug_ext.cli import main
from artaug_ext.errors import UsageError
from artaug_ext.recipe.config import load_recipe
from artaug_ext.recipe.runner import run_recipe
from artaug_ext.tiny.models import TinyFluxDiT
from artaug_ext.train import differential, loop
from artaug_ext.train.cache import LatentCache
from artaug_ext.train.differential import LoRATrainSettings, train_round_lora, train_stage
from artaug_ext.train.flow import FlowMatchObjective, FluxDenoiser
from artaug_ext.train.loop import ParameterEMA, TrainConfig, train, trainable_parameters
from artaug_ext.train.lora import inject_lora
from artaug_ext.train.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def _dit():
    torch.manual_seed(0)
    return TinyFluxDiT(dim=64, num_heads=1, num_joint_blocks=1, num_single_blocks=1, axes_dim=(16, 24, 24),
                       input_dim=64, text_dim=16, pooled_dim=8)


def _cache(ids=("a", "b", "c"), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    return LatentCache(list(ids), torch.randn(n, 16, 8, 8, generator=g), torch.randn(n, 16, 8, 8, generator=g),
                       torch.randn(n, 4, 16, generator=g), torch.randn(n, 8, generator=g))


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --- the defaults: bitwise what the code trained before optimizer / ema_decay existed -------------

# A batched round of the micro cache above with these settings, trained at commit bb898a1 (before
# the keys existed) on the development machine (2 CPU cores, one torch thread, fp32, the Triton
# interpreter this conftest sets, which LoRA_1's merge under stage 2 runs on): the sha256 of each
# stage's LoRA, of the round's LoRA, of each stage record (which holds the stage's identity) and
# of stage 1's paired gap.
DEFAULT_SETTINGS = LoRATrainSettings(rank=2, steps_stage1=4, steps_stage2=4, batch_size=2, checkpoint_every=2, lr=1e-2)
BEFORE_THE_KEYS = {
    "stage1/lora.safetensors": "b28110922b703412d40802cf9a8b02e2af26ba7adb6478c511affea2f78fa28b",
    "stage2/lora.safetensors": "0489cc685dbf372c69c05dc3c3ffc7299cde504e6afeade031ca99985f7e9570",
    "lora.safetensors": "6cd2f9c5aa6686a3be069bfe9829b169c3e4cf0b87b62b46baac322abef2e757",
    "stage1/stage.json": "63bc0f8feda204d8437e304e352aa5b8a4c780f5db53d435bd8929d74ef4fe71",
    "stage2/stage.json": "92bdcd23338feeda016f17b99f0c80001b0b13537b234a3100dcd2b0b922f787",
    "stage1/gap.json": "bd802897df02f99874e6ed83cf668cd6448ad9072913efcac0db328798bf4502",
}


@pytest.fixture(scope="module")
def default_round(tmp_path_factory):
    folder = tmp_path_factory.mktemp("defaults") / "round"
    train_round_lora(_dit(), _cache(), DEFAULT_SETTINGS, str(folder), progress=False)
    return folder


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="pinned on CPU in fp32 with the Triton interpreter (CUDA trains in bf16)")
def test_the_default_settings_train_bitwise_what_they_trained_before(default_round):
    got = {rel: _sha256(default_round / rel) for rel in BEFORE_THE_KEYS}
    assert got == BEFORE_THE_KEYS


def test_the_keys_are_in_the_identity_only_when_set():
    plain = LoRATrainSettings().identity()
    assert "optimizer" not in plain and "ema_decay" not in plain
    assert "optimizer" not in TrainSettings(optimizer="adamw").identity()
    assert LoRATrainSettings(optimizer="adamw8bit").identity()["optimizer"] == "adamw8bit"
    assert LoRATrainSettings(ema_decay=0.9).identity()["ema_decay"] == 0.9
    assert TrainSettings(ema_decay=0.5).identity()["ema_decay"] == 0.5


@pytest.mark.parametrize(("change", "named"), [({"optimizer": "adamw8bit"}, r"optimizer: null -> adamw8bit"),
                                               ({"ema_decay": 0.9}, r"ema_decay: null -> 0\.9")])
def test_a_stage_made_without_the_key_is_refused_at_another_value(default_round, monkeypatch, change, named):
    def no_training(*args, **kwargs):
        raise AssertionError("a stage of other settings was trained on")

    record = json.loads((default_round / "stage1" / "stage.json").read_text())
    assert "optimizer" not in record and "ema_decay" not in record
    monkeypatch.setattr(differential, "train", no_training)
    with pytest.raises(UsageError, match=rf"stage1 holds a stage trained with other settings \({named}\)"):
        train_round_lora(_dit(), _cache(), dataclasses.replace(DEFAULT_SETTINGS, **change), str(default_round),
                         progress=False)


def test_a_checkpoint_of_another_optimizer_is_refused_not_resumed(tmp_path):
    model = _toy_model()
    cfg = TrainConfig(output_dir=str(tmp_path / "t"), steps=2, settings=TrainSettings(checkpoint_every=1, lr=1e-2),
                      progress=False)
    train(model, _toy_loss, _toy_batch, 4, cfg)
    cfg.steps = 3
    cfg.settings = dataclasses.replace(cfg.settings, optimizer="adamw8bit")
    with pytest.raises(UsageError, match=r"holds a training with other settings \(optimizer: null -> adamw8bit\)"):
        train(_toy_model(), _toy_loss, _toy_batch, 4, cfg)


# --- adamw8bit ----------------------------------------------------------------------------------

class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 24)


def _toy_model():
    torch.manual_seed(1)
    model = _Toy()
    inject_lora(model, 4, target_modules=["proj"], init_seed=1)
    return model


_TARGET = torch.randn(64, 24, generator=torch.Generator().manual_seed(2))
_INPUT = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))


def _toy_batch(indices):
    return {"x": _INPUT[indices], "y": _TARGET[indices]}


def _toy_loss(model, batch, rng):
    return torch.nn.functional.mse_loss(model.proj(batch["x"]), batch["y"])


def _full_loss(model) -> float:
    with torch.no_grad():
        return float(_toy_loss(model, _toy_batch(list(range(64))), None))


def test_adamw8bit_holds_8_bit_moments_of_every_lora_tensor_and_lowers_the_loss(tmp_path, monkeypatch):
    made = []
    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda params, cfg: made.append(real(params, cfg)) or made[-1])
    model = _toy_model()
    before = _full_loss(model)
    cfg = TrainConfig(output_dir=str(tmp_path / "t"), steps=30, progress=False,
                      settings=TrainSettings(optimizer="adamw8bit", lr=1e-2, batch_size=16, checkpoint_every=0))
    train(model, _toy_loss, _toy_batch, 64, cfg)
    import bitsandbytes as bnb

    optimizer = made[0]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    params = trainable_parameters(model)
    assert len(params) == 2 and all(p.numel() < 4096 for p in params.values())  # below bnb's default min_8bit_size
    for name, p in params.items():
        state = optimizer.state[p]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8, name
        assert state["state1"].shape == p.shape and state["qmap1"].numel() == 256  # one byte a value, 256 codes
    assert _full_loss(model) < 0.9 * before


def _stage_lora(tmp_path, name, steps, **settings):
    s = LoRATrainSettings(rank=4, batch_size=2, checkpoint_every=0, lr=1e-3, **settings)
    return train_stage(_dit(), _cache(), "original", s, str(tmp_path / name), 0, steps, progress=False)


def _initial_lora():
    dit = _dit()
    inject_lora(dit, 4, target_modules=LoRATrainSettings().target_modules, init_seed=0)
    return {n: p.detach().clone() for n, p in trainable_parameters(dit).items()}


def test_adamw8bit_trains_the_tiny_dit_as_fp32_adamw_within_the_quantisation_error(tmp_path):
    """Measured on the micro cache (rank 4, lr 1e-3): after 1 step the LoRAs agree to 4e-8 of
    the update (bitsandbytes updates from the new fp32 moments and stores them quantised
    after, so the first step is fp32 AdamW's); after 5 and 20 steps the 8-bit LoRA is 1.5% and
    1.8% of the update ||w - w0|| away from fp32 AdamW's. The moments are stored as 8-bit
    dynamic codes scaled by each 256-value block's maximum, a relative error of about 1% on
    the larger values, which m / sqrt(v) passes on at that order; the tolerance, 5% of the
    update, is about 3x the measured drift, and the drift must be above 1e-4 (the moments
    really were 8-bit, not 32-bit)."""
    init = {k.replace(".default", ""): v for k, v in _initial_lora().items()}
    for steps, low, high in ((1, 0.0, 1e-6), (5, 1e-4, 0.05), (20, 1e-4, 0.05)):
        fp32 = _stage_lora(tmp_path, f"fp32-{steps}", steps)
        q8 = _stage_lora(tmp_path, f"8bit-{steps}", steps, optimizer="adamw8bit")
        keys = sorted(fp32)
        assert len(keys) == len(init)
        drift = sum(float(((q8[k] - fp32[k]).double() ** 2).sum()) for k in keys) ** 0.5
        update = sum(float(((fp32[k].double() - init[k.replace(".default", "")].double()) ** 2).sum())
                     for k in keys) ** 0.5
        assert update > 0
        assert low <= drift / update < high, (steps, drift / update)


# --- EMA ----------------------------------------------------------------------------------------

def test_the_stage_lora_is_the_fp64_average_of_the_weights_after_each_step(tmp_path, monkeypatch):
    decay, steps = 0.8, 6
    after_steps = []
    real_train = differential.train

    def recording_train(model, loss_fn, get_batch, n, cfg, accelerator=None, on_step=None, extra_state=None):
        params = trainable_parameters(model)
        after_steps.append({k: p.detach().double().clone() for k, p in params.items()})  # the start

        def hook(step, loss):
            after_steps.append({k: p.detach().double().clone() for k, p in params.items()})

        return real_train(model, loss_fn, get_batch, n, cfg, accelerator=accelerator, on_step=hook,
                          extra_state=extra_state)

    monkeypatch.setattr(differential, "train", recording_train)
    settings = LoRATrainSettings(rank=4, alpha=2.0, batch_size=2, checkpoint_every=0, lr=3e-3, ema_decay=decay)
    returned = train_stage(_dit(), _cache(), "original", settings, str(tmp_path / "s"), 0, steps, progress=False)
    assert len(after_steps) == steps + 1
    average = dict(after_steps[0])
    for weights in after_steps[1:]:
        average = {k: decay * average[k] + (1 - decay) * weights[k] for k in average}
    saved = load_file(str(tmp_path / "s" / "lora.safetensors"))
    scale = 2.0 / 4  # alpha / rank, folded into lora_B
    assert len(saved) == len(average)
    for k, want in average.items():
        key = k.removeprefix("dit.").replace(".default", "")
        want = want * scale if ".lora_B." in k else want
        got = saved[key].double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7 * float(want.abs().max())), key
        assert torch.equal(returned[k.removeprefix("dit.")], saved[key])
    last = after_steps[-1]
    moved = max(float((average[k] - last[k]).abs().max()) for k in last)
    assert moved > 1e-4  # the average is not the last weights (the test could tell them apart)


def test_the_paired_gap_after_an_ema_stage_is_measured_on_the_average(tmp_path):
    settings = LoRATrainSettings(rank=4, batch_size=2, checkpoint_every=0, lr=3e-3, ema_decay=0.7)
    train_stage(_dit(), _cache(), "original", settings, str(tmp_path / "s"), 0, 5, progress=False)
    gap = json.loads((tmp_path / "s" / "gap.json").read_text())
    saved = load_file(str(tmp_path / "s" / "lora.safetensors"))
    dit = _dit()  # the saved LoRA in fresh adapters (alpha = rank: scale 1)
    inject_lora(dit, 4, target_modules=settings.target_modules, init_seed=0)
    with torch.no_grad():
        for k, p in trainable_parameters(dit).items():
            p.copy_(saved[k.replace(".default", "")])
    objective = FlowMatchObjective(weighting=settings.weighting, guidance=settings.guidance,
                                   sampling=settings.timestep_sampling)
    again = differential.paired_gap(FluxDenoiser(dit), _cache(), objective, settings.batch_size, torch.float32)
    assert again["after"] == pytest.approx(gap["after"], rel=1e-6)
    assert again["before"] == pytest.approx(gap["before"], rel=1e-6)


def test_the_ema_object_checkpoints_and_refuses_another_decay():
    p = {"w": torch.nn.Parameter(torch.ones(3))}
    ema = ParameterEMA(p, 0.5)
    with torch.no_grad():
        p["w"].fill_(3.0)
    ema.update()
    assert torch.equal(ema.average["w"], torch.full((3,), 2.0))
    with ema.applied():
        assert torch.equal(p["w"].detach(), torch.full((3,), 2.0))
    assert torch.equal(p["w"].detach(), torch.full((3,), 3.0))  # the trained weights again
    other = ParameterEMA(p, 0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.average["w"], ema.average["w"])
    with pytest.raises(UsageError, match="EMA checkpoint of decay 0.5"):
        ParameterEMA(p, 0.9).load_state_dict(ema.state_dict())


# --- kill -9 inside a stage with both ----------------------------------------------------------

@pytest.mark.parametrize("pause_at", ["step:5"])  # stage 2's second step (stage 1 has 3): both stages resume
@pytest.mark.parametrize("quantize", [None, "torchao_int8_w8a16"])  # on the int8 base: LoRA_1 hot-loaded under stage 2
def test_kill_9_inside_an_adamw8bit_ema_stage_then_resume_gives_the_same_loras(pipe, tmp_path, pause_at, quantize):
    if quantize:
        pytest.importorskip("torchao")
    recipe = micro_recipe(tmp_path / "micro.toml", run={"rounds": 1, "quantize": quantize},
                          train={"optimizer": "adamw8bit", "ema_decay": 0.6, "checkpoint_every": 1})
    run_recipe(load_recipe(str(recipe)), str(tmp_path / "ref"), device="cpu", progress=False)
    args = ["run", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu", "--threads", "1", "--no-progress"]
    kill_when_paused(args, pause_at, tmp_path / "paused")
    stage2 = tmp_path / "run" / "rounds" / "round-01" / "stage2"
    assert (stage2 / "checkpoint-1").is_dir() and not (stage2 / "lora.safetensors").exists()
    done = subprocess.run([sys.executable, "-m", "artaug_ext.cli", *args], env=child_env(), capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    for rel in ("rounds/round-01/stage1/lora.safetensors", "rounds/round-01/stage2/lora.safetensors",
                "rounds/round-01/lora.safetensors", "final/lora.safetensors"):
        assert (tmp_path / "run" / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes(), rel
    state = torch.load(stage2 / "checkpoint-3" / "state.pt", map_location="cpu", weights_only=True)
    assert state["extra"]["ema"]["decay"] == 0.6
    assert "__bnb_optimizer_quant_state__" in next(iter(state["optimizer"]["state"].values()))


@pytest.mark.slow
def test_two_ranks_with_both_train_the_one_process_loras_of_the_same_global_batch(pipe, tmp_path):
    """Every rank keeps the EMA (each merges the LoRA it returns); the main process writes it.
    Measured: stage 1 within 2.9e-5 and stage 2 within 2.4e-4 of the LoRA's largest weight
    (fp32 summation order, which an 8-bit code boundary can amplify; fp32 AdamW: 3.6e-5)."""
    train = {"optimizer": "adamw8bit", "ema_decay": 0.6, "checkpoint_every": 1}
    two = micro_recipe(tmp_path / "two.toml", run={"rounds": 1}, train=train)
    one = micro_recipe(tmp_path / "one.toml", run={"rounds": 1}, train={**train, "batch_size": 4})  # the global batch
    results = wait_ranks(start_ranks(["run", str(two), "--out", str(tmp_path / "two"), "--device", "cpu",
                                      "--no-progress"]), timeout=900)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    run_recipe(load_recipe(str(one)), str(tmp_path / "one"), device="cpu", progress=False)
    for rel in ("rounds/round-01/stage1/lora.safetensors", "rounds/round-01/stage2/lora.safetensors"):
        a, b = load_file(tmp_path / "one" / rel), load_file(tmp_path / "two" / rel)
        largest = max(float(v.abs().max()) for v in a.values())
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3 * largest, rel


def test_a_run_recorded_before_the_keys_existed_resumes_at_their_defaults(tmp_path):
    from artaug_ext.recipe.runner import _check_run_json

    out, recipe = run_recorded_before(tmp_path, {"train": ("optimizer", "ema_decay")})
    _check_run_json(str(out), recipe)  # the defaults: the same run
    for key, value in (("optimizer", "adamw8bit"), ("ema_decay", 0.9)):
        changed = load_recipe(str(micro_recipe(tmp_path / f"{key}.toml", train={key: value})))
        with pytest.raises(UsageError, match=rf"holds a run of another recipe \(recipe\.train\.{key}"):
            _check_run_json(str(out), changed)


# --- bad values ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "message"), [
    ("sgd", r"micro\.toml:\d+: train\.optimizer 'sgd': use one of adamw, adamw8bit$"),
    ("AdamW", r"micro\.toml:\d+: train\.optimizer 'AdamW': use one of adamw, adamw8bit$"),
])
def test_an_unknown_optimizer_is_one_line_naming_the_key(tmp_path, value, message):
    with pytest.raises(UsageError, match=message):
        load_recipe(str(micro_recipe(tmp_path / "micro.toml", train={"optimizer": value})))


@pytest.mark.parametrize("value", ["0", "1", "1.0", "-0.5", "1.5", "inf", "nan"])
def test_an_ema_decay_outside_0_1_is_one_line_naming_the_key(tmp_path, value):
    path = micro_recipe(tmp_path / "micro.toml")
    path.write_text(path.read_text().replace("[train]\n", f"[train]\nema_decay = {value}\n"))
    with pytest.raises(UsageError, match=r"micro\.toml:\d+: train\.ema_decay .*: must be between 0 and 1") as e:
        load_recipe(str(path))
    assert "\n" not in str(e.value)


def test_an_ema_decay_of_another_type_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(UsageError, match=r"micro\.toml:\d+: train\.ema_decay = 'high' must be float \| None"):
        load_recipe(str(micro_recipe(tmp_path / "micro.toml", train={"ema_decay": "high"})))


def test_adamw8bit_without_bitsandbytes_is_refused_at_the_dry_run_naming_the_extra(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    path = micro_recipe(tmp_path / "micro.toml", train={"optimizer": "adamw8bit"})
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "train.optimizer 'adamw8bit': needs the bitsandbytes package" in err and "quant" in err
    monkeypatch.undo()
    assert main(["run", str(path), "--dry-run"]) == 0  # installed: the same recipe plans


def test_a_run_refuses_bad_values_before_any_model_loads(tmp_path, monkeypatch):
    from artaug_ext import pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    path = micro_recipe(tmp_path / "micro.toml", train={"ema_decay": 2.0})
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert not (tmp_path / "run").exists()
