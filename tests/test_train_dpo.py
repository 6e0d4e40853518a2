"""The paired objective (Flow-DPO) and the paired gap every stage measures: values against an
fp64 reference written here, the base as reference, the same draws for both images of a pair,
the stage's identity, the recipe keys, and resume after kill -9."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, child_env, kill_when_paused, micro_recipe, run_recorded_before

from artaug_ext.errors import UsageError
from artaug_ext.recipe.config import load_recipe
from artaug_ext.recipe.runner import run_recipe
from artaug_ext.train.flow import FlowDPOObjective, FlowMatchObjective, paired_errors
from artaug_ext.train.loop import SampleRandom
from artaug_ext.train.lora import adapters_disabled, inject_lora

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyDenoiser(torch.nn.Module):
    """A linear velocity model over the latent's channels (FLUX's call signature), with a LoRA."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(channels, channels)

    def forward(self, latents, timestep, prompt_emb, pooled_prompt_emb, guidance):
        x = latents.movedim(1, -1)
        return self.proj(x).movedim(-1, 1) * (1 + timestep.view(-1, 1, 1, 1) / 1000)


def _toy(seed=0, lora=True):
    torch.manual_seed(seed)
    model = ToyDenoiser()
    if lora:
        inject_lora(model, 2, target_modules=["proj"], init_seed=seed)
        with torch.no_grad():  # a LoRA that has moved (B is zero at init)
            model.proj.lora_B["default"].weight.normal_(0, 0.3)
    return model


def _batch(b=3, same=False):
    g = torch.Generator().manual_seed(1)
    original = torch.randn(b, 4, 5, 3, generator=g)
    enhanced = original.clone() if same else torch.randn(b, 4, 5, 3, generator=g)
    return {"original": original, "enhanced": enhanced, "prompt_emb": torch.zeros(b, 2, 8),
            "pooled_prompt_emb": torch.zeros(b, 8)}


def _reference_errors(weight, bias, batch, sigma, timestep, wts, noise):
    """fp64 errors of one linear model (weight, bias) on both images under the given draws."""
    out = []
    for side in ("original", "enhanced"):
        x0 = batch[side].double()
        s = sigma.double().view(-1, 1, 1, 1)
        n = noise.double()
        xt = (1 - s) * x0 + s * n
        pred = (torch.einsum("oc,bchw->bohw", weight.double(), xt) + bias.double().view(1, -1, 1, 1))
        pred = pred * (1 + timestep.double().view(-1, 1, 1, 1) / 1000)
        out.append(((pred - (n - x0)) ** 2).mean(dim=(1, 2, 3)) * wts.double())
    return out


def test_flow_dpo_loss_equals_the_fp64_formula_with_the_base_as_reference():
    model, batch, beta = _toy(), _batch(), 250.0
    obj = FlowMatchObjective(guidance=1.0)
    dpo = FlowDPOObjective(obj, beta, lambda: adapters_disabled(model))
    loss, metrics = dpo(model, batch, SampleRandom(7, [0, 1, 2]))
    sigma, timestep, wts, noise = obj.draw(SampleRandom(7, [0, 1, 2]), batch["original"])
    layer = model.proj
    merged = layer.base_layer.weight + layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    eo, ee = _reference_errors(merged, layer.base_layer.bias, batch, sigma, timestep, wts, noise)
    ro, re = _reference_errors(layer.base_layer.weight, layer.base_layer.bias, batch, sigma, timestep, wts, noise)
    margin = ((ee - eo) - (re - ro)).detach()
    want = -torch.nn.functional.logsigmoid(-beta * margin).mean()
    assert math.isclose(float(loss.detach()), float(want.detach()), rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(metrics["gap"], float((ee - eo).detach().mean()), rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(metrics["ref_gap"], float((re - ro).detach().mean()), rel_tol=1e-4, abs_tol=1e-7)
    assert metrics["accuracy"] == pytest.approx(float((margin < 0).double().mean()), abs=1e-7)
    loss.backward()
    assert float(layer.lora_B["default"].weight.grad.abs().sum()) > 0  # it trains the LoRA
    assert layer.base_layer.weight.grad is None  # and nothing else
    assert all(not m._disable_adapters for m in [layer])  # the adapters are on again


def test_the_sft_weight_adds_the_enhanced_images_own_error():
    model, batch, obj = _toy(), _batch(), FlowMatchObjective()
    pure, _ = FlowDPOObjective(obj, 300.0, lambda: adapters_disabled(model))(model, batch, SampleRandom(2, [0, 1, 2]))
    mixed, _ = FlowDPOObjective(obj, 300.0, lambda: adapters_disabled(model), sft_weight=0.5)(
        model, batch, SampleRandom(2, [0, 1, 2]))
    with torch.no_grad():
        _, e_enh = paired_errors(obj, model, batch, obj.draw(SampleRandom(2, [0, 1, 2]), batch["original"]))
    assert float(mixed.detach()) == pytest.approx(float(pure.detach()) + 0.5 * float(e_enh.mean()), rel=1e-6)
    with pytest.raises(UsageError, match="sft weight must be 0 or positive"):
        FlowDPOObjective(obj, 300.0, None, sft_weight=-1.0)


def test_a_fresh_lora_is_its_reference_so_the_loss_is_log_2():
    model = _toy(lora=False)
    inject_lora(model, 2, target_modules=["proj"], init_seed=0)  # B = 0: the model is the base
    loss, metrics = FlowDPOObjective(FlowMatchObjective(), 1000.0, lambda: adapters_disabled(model))(
        model, _batch(), SampleRandom(0, [0, 1, 2]))
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["gap"] == metrics["ref_gap"]


def test_both_images_of_a_pair_share_the_noise_and_timestep():
    """Identical images give exactly equal errors: the draws are the pair's, not the image's."""
    model, batch, obj = _toy(), _batch(b=4, same=True), FlowMatchObjective()
    with torch.no_grad():
        e_orig, e_enh = paired_errors(obj, model, batch, obj.draw(SampleRandom(3, [5, 6, 7, 8]), batch["original"]))
    assert torch.equal(e_orig, e_enh) and float(e_orig.min()) > 0


def test_dpo_beta_must_be_positive():
    with pytest.raises(UsageError, match="beta must be positive"):
        FlowDPOObjective(FlowMatchObjective(), 0.0, None)


def test_dpo_identity_holds_beta_and_the_other_modes_identities_are_unchanged():
    from artaug_ext.train.settings import LoRATrainSettings

    for mode in ("batched", "per-pair", "sft"):
        ident = LoRATrainSettings(mode=mode).identity()
        assert "dpo_beta" not in ident and "objective" not in ident
    dpo = LoRATrainSettings(mode="dpo", dpo_beta=123.0).identity()
    assert dpo["objective"] == "dpo" and dpo["dpo_beta"] == 123.0 and "dpo_sft_weight" not in dpo
    assert LoRATrainSettings(mode="dpo", dpo_sft_weight=0.5).identity()["dpo_sft_weight"] == 0.5


def _cache(n=4):
    from artaug_ext.train.cache import LatentCache

    g = torch.Generator().manual_seed(0)
    return LatentCache([f"p{i}" for i in range(n)], torch.randn(n, 16, 4, 4, generator=g),
                       torch.randn(n, 16, 4, 4, generator=g), torch.randn(n, 32, 64, generator=g),
                       torch.randn(n, 32, generator=g))


def test_a_dpo_round_trains_one_paired_stage_that_learns_the_difference(pipe, tmp_path):
    from artaug_ext.train.differential import LoRATrainSettings, train_round_lora
    from artaug_ext.train.loss_log import read_loss_log

    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    settings = LoRATrainSettings(mode="dpo", rank=4, steps_stage2=12, batch_size=4, checkpoint_every=0, lr=3e-3,
                                 dpo_beta=200.0)
    result = train_round_lora(pipe.dit, _cache(), settings, str(tmp_path / "r"), progress=False)
    assert sorted(os.listdir(tmp_path / "r")) == ["dpo", "lora.safetensors", "train.json"]
    log = read_loss_log(str(tmp_path / "r" / "dpo"))
    assert len(log) == 12 and {"gap", "ref_gap", "accuracy"} <= set(log[0])
    assert log[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # the fresh LoRA is the reference
    gap = json.loads((tmp_path / "r" / "dpo" / "gap.json").read_text())
    # the LoRA made the enhanced images easier relative to the originals, on the fixed draws
    assert gap["learned"] < 0 and gap["after"]["gap"] < gap["before"]["gap"]
    assert gap["learned"] == pytest.approx(gap["after"]["gap"] - gap["before"]["gap"])
    assert result.info["gaps"]["dpo"] == gap
    assert all(torch.equal(pipe.dit.state_dict()[k], v) for k, v in before.items())  # the base is untouched


def test_a_dpo_stage_trained_with_another_beta_is_refused_not_reused(pipe, tmp_path):
    from artaug_ext.train.differential import LoRATrainSettings, train_round_lora

    settings = LoRATrainSettings(mode="dpo", rank=2, steps_stage2=2, batch_size=2, checkpoint_every=0)
    train_round_lora(pipe.dit, _cache(2), settings, str(tmp_path / "r"), progress=False)
    settings.dpo_beta = 50.0
    with pytest.raises(UsageError, match=r"dpo_beta: 500\.0 -> 50\.0"):
        train_round_lora(pipe.dit, _cache(2), settings, str(tmp_path / "r"), progress=False)


def test_every_stage_of_a_batched_round_records_its_paired_gap(pipe, tmp_path):
    from artaug_ext.train.differential import LoRATrainSettings, train_round_lora

    settings = LoRATrainSettings(rank=2, steps_stage1=2, steps_stage2=2, batch_size=2, checkpoint_every=0)
    result = train_round_lora(pipe.dit, _cache(3), settings, str(tmp_path / "r"), progress=False)
    for stage in ("stage1", "stage2"):
        gap = result.info["gaps"][stage]
        assert gap["pairs"] == 3 and gap["draws"] == 2
        assert gap["before"]["gap"] == pytest.approx(gap["before"]["enhanced"] - gap["before"]["original"])
    # stage 2 starts on base + LoRA_1, stage 1 on the base: their "before" errors differ
    assert result.info["gaps"]["stage1"]["before"] != result.info["gaps"]["stage2"]["before"]


@pytest.mark.parametrize("table, key, value, message", [
    ("train", "dpo_beta", 0.0, r"micro\.toml:\d+: train\.dpo_beta 0\.0: must be a positive number"),
    ("train", "dpo_sft_weight", -0.5, r"micro\.toml:\d+: train\.dpo_sft_weight -0\.5: must be 0"),
    ("train", "mode", "dpo2", r"train\.mode 'dpo2': use one of batched, per-pair, sft, dpo"),
    ("filter", "keep", "all", r"micro\.toml:\d+: filter\.keep 'all': use one of score, enhanced"),
])
def test_bad_values_of_the_new_keys_are_one_line_naming_the_key(tmp_path, table, key, value, message):
    path = micro_recipe(tmp_path / "micro.toml", **{table: {key: value}})
    with pytest.raises(UsageError, match=message):
        load_recipe(str(path))


def test_keep_enhanced_trains_on_every_enhanced_pair(pipe, tmp_path):
    """filter.keep = "enhanced": the pairs the filter rejected are trained on too."""
    path = micro_recipe(tmp_path / "micro.toml", run={"rounds": 1}, filter={"margin": 10.0, "keep": "enhanced"},
                        train={"mode": "dpo", "steps_stage2": 2, "checkpoint_every": 0})
    summary = run_recipe(load_recipe(str(path)), str(tmp_path / "run"), device="cpu", progress=False)
    r = summary["rounds"][0]
    assert r["kept"] == 0 and r["trained_pairs"] == r["enhanced"] > 0  # margin 10: the filter keeps nothing
    assert set(r["train"]["dpo"]["paired_gap"]) == {"before", "after", "learned"}


def test_kill_9_inside_a_dpo_stage_then_resume_gives_the_same_lora(pipe, tmp_path):
    recipe = micro_recipe(tmp_path / "micro.toml", run={"rounds": 1}, filter={"keep": "enhanced"},
                          train={"mode": "dpo", "steps_stage2": 4, "checkpoint_every": 1})
    run_recipe(load_recipe(str(recipe)), str(tmp_path / "ref"), device="cpu", progress=False)
    args = ["run", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu", "--threads", "1", "--no-progress"]
    kill_when_paused(args, "step:3", tmp_path / "paused")
    assert (tmp_path / "run" / "rounds" / "round-01" / "dpo").is_dir()
    assert not (tmp_path / "run" / "rounds" / "round-01" / "lora.safetensors").exists()
    done = subprocess.run([sys.executable, "-m", "artaug_ext.cli", *args], env=child_env(), capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    for rel in ("rounds/round-01/lora.safetensors", "final/lora.safetensors"):
        assert (tmp_path / "run" / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes(), rel


def test_a_run_recorded_before_a_key_existed_resumes_at_its_default_and_is_refused_at_another(tmp_path):
    """Upgrades add recipe keys (train.dpo_sft_weight, filter.keep): a run folder whose record
    lacks one still matches the recipe while the recipe holds the key's default."""
    from artaug_ext.recipe.runner import _check_run_json

    out, recipe = run_recorded_before(tmp_path, {"train": ("dpo_sft_weight",), "filter": ("keep",)})
    _check_run_json(str(out), recipe)  # the defaults: the same run
    assert "keep" not in json.loads((out / "run.json").read_text())["recipe"]["filter"]  # nothing rewritten
    changed = load_recipe(str(micro_recipe(tmp_path / "other.toml", filter={"keep": "enhanced"})))
    with pytest.raises(UsageError, match=r"holds a run of another recipe \(recipe\.filter\.keep"):
        _check_run_json(str(out), changed)
