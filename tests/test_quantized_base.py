"""A quantised frozen base through DiffSynth's own quantisation (`[run] quantize`, `--quantize`):
methods checked before any model loads, LoRAs hot-loaded on quantised layers (values against an
fp64 reference of the dequantised weight plus the factors, and undone exactly), both stages
trained on it (close to the full-precision base's LoRA, measured against the spread of two
full-precision seeds), and a whole micro run on it whose LoRA loads into an unquantised pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, child_env, micro_recipe

from artaug_ext.errors import UsageError
from artaug_ext.recipe.config import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("torchao", reason="the quant extra (pip install -e '.[quant]') is not installed")

INT8 = "torchao_int8_w8a16"
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def qpipe():
    import artaug_ext

    return artaug_ext.load_pipeline("tiny-random", device="cpu", quantize=INT8)


def _random_lora(dit, rank=4, seed=0) -> dict:
    """A training-format LoRA of the tiny DiT with moved B factors (as a trained one has)."""
    from artaug_ext.train.lora import _without_adapter_name, inject_lora, lora_state_dict, remove_lora

    inject_lora(dit, rank, init_seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    state = _without_adapter_name(lora_state_dict(dit))
    remove_lora(dit)
    return state


@pytest.mark.parametrize("table, message", [
    ({"quantize": "int8"}, "run.quantize 'int8' is not a DiffSynth quantisation method; use one of"),
    ({"quantize": "torchao_int8_w8a8"}, "run.quantize 'torchao_int8_w8a8': DiffSynth's torchao backend declares it "
                                        "non-differentiable"),
    ({"text_encoders": "gpu"}, "run.text_encoders 'gpu': use one of resident, quantized, offloaded"),
    ({"text_encoders": "quantized"}, "run.text_encoders quantized needs run.quantize"),
])
def test_a_bad_quantisation_is_one_line_naming_the_key_before_any_model_loads(tmp_path, table, message):
    path = micro_recipe(tmp_path / "r.toml", run=table)
    with pytest.raises(UsageError) as e:
        load_recipe(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert f"r.toml:{_line(path, next(iter(table)))}" in str(e.value)


def _line(path, key) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(f"{key} ="))


def test_a_method_whose_package_is_missing_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    import artaug_ext.quant as quant

    real = importlib.util.find_spec
    monkeypatch.setattr(quant.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    path = micro_recipe(tmp_path / "r.toml", run={"quantize": "bitsandbytes_nf4"})
    with pytest.raises(UsageError, match=r"run.quantize 'bitsandbytes_nf4' needs the bitsandbytes package, which is "
                                         r"not installed: pip install -e \"\.\[quant\]\""):
        load_recipe(str(path))


def test_the_dry_run_refuses_a_bad_method_in_one_line(tmp_path):
    path = micro_recipe(tmp_path / "r.toml", run={"quantize": "int4"})
    proc = subprocess.run([sys.executable, "-m", "artaug_ext.cli", "run", str(path), "--dry-run"], capture_output=True,
                          text=True, cwd=REPO, env=child_env(), timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "run.quantize 'int4' is not a DiffSynth quantisation method" in lines[0]


def test_loras_on_a_quantised_pipeline_are_hot_loaded_exactly_and_undone_bitwise(qpipe):
    from diffsynth.core.vram.layers import AutoWrappedQuantizedModule

    import artaug_ext

    dit = qpipe.dit
    state = _random_lora(dit)
    layer = dit.get_submodule("blocks.0.attn.a_to_qkv")
    assert isinstance(layer, AutoWrappedQuantizedModule)
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before_layer = layer(x)
    before = np.asarray(artaug_ext.generate(qpipe, PROMPT, steps=2, height=64, width=64, progress=False))

    report = artaug_ext.load_lora(qpipe, state)
    assert report.merged == [] and len(report.hotloaded) == len(state) // 2
    assert report.quantized == [INT8] and f"(quantised base, {INT8}: hot-loaded, not merged)" in str(report)
    with torch.no_grad():
        got = layer(x).double()
    w = layer.module.weight.dequantize().double()  # what the quantised layer computes with
    a = state["blocks.0.attn.a_to_qkv.lora_A.weight"].double()
    b = state["blocks.0.attn.a_to_qkv.lora_B.weight"].double()
    want = x.double() @ w.T + layer.module.bias.double() + x.double() @ a.T @ b.T
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    with_lora = np.asarray(artaug_ext.generate(qpipe, PROMPT, steps=2, height=64, width=64, progress=False))
    assert np.abs(with_lora.astype(float) - before).mean() > 0.1  # the LoRA reaches the image (measured 0.44)

    assert artaug_ext.unload_lora(qpipe, report) == 1
    with torch.no_grad():
        assert torch.equal(layer(x), before_layer)
    again = np.asarray(artaug_ext.generate(qpipe, PROMPT, steps=2, height=64, width=64, progress=False))
    assert np.array_equal(again, before)


def test_a_pipeline_quantised_through_diffsynth_itself_is_wrapped_for_hot_loading_by_load_lora(qpipe):
    from diffsynth.core import ModelConfig
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    import artaug_ext
    from artaug_ext.pipeline import model_paths
    from artaug_ext.quant import quantize_config

    paths = model_paths("tiny-random")
    configs = [ModelConfig(path=paths["dit"], quantize=quantize_config(INT8))] + [
        ModelConfig(path=paths[r]) for r in ("text_encoder", "text_encoder_2", "vae")]
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                             tokenizer_1_config=ModelConfig(path=paths["tokenizer"]),
                                             tokenizer_2_config=ModelConfig(path=paths["tokenizer_2"]))
    state = _random_lora(qpipe.dit)
    bare = pipe.dit
    with pytest.raises(Exception, match="is quantised .* pass the pipeline"):
        artaug_ext.load_lora(bare, state)  # a bare quantised module cannot be wrapped in its owner
    report = artaug_ext.load_lora(pipe, state)
    assert len(report.hotloaded) == len(state) // 2 and pipe.dit.vram_management_enabled


def _cache(n=4):
    from artaug_ext.train.cache import LatentCache

    g = torch.Generator().manual_seed(0)
    return LatentCache([f"p{i}" for i in range(n)], torch.randn(n, 16, 4, 4, generator=g),
                       torch.randn(n, 16, 4, 4, generator=g), torch.randn(n, 32, 64, generator=g),
                       torch.randn(n, 32, generator=g))


def _delta_difference(a: dict, b: dict) -> float:
    """|dW_a - dW_b| / |dW_b| over every layer (dW = B @ A, fp64)."""
    num = den = 0.0
    for key in b:
        if ".lora_A." in key:
            kb = key.replace(".lora_A.", ".lora_B.")
            da, db = a[kb].double() @ a[key].double(), b[kb].double() @ b[key].double()
            num += float((da - db).norm() ** 2)
            den += float(db.norm() ** 2)
    return (num / den) ** 0.5


def test_both_stages_train_on_the_quantised_base_close_to_the_full_precision_base(qpipe, pipe, tmp_path):
    """The same stages on the same cache: the int8 base's LoRA differs from the fp32 base's by
    4% of its norm (measured: 3.9% on tiny-random, 4.2% on tiny, 6 + 6 steps at lr 1e-3), while
    two fp32 LoRAs that differ only in their seed differ by about 100%: the quantised base trains
    the same LoRA up to int8's rounding (0.3% of each weight), which Adam's normalised steps
    turn into a few per cent where a gradient element is near zero. Bound: 2x the measurement."""
    from artaug_ext.train.differential import LoRATrainSettings, train_round_lora

    settings = LoRATrainSettings(rank=4, steps_stage1=6, steps_stage2=6, batch_size=2, checkpoint_every=0, lr=1e-3)
    fp32 = train_round_lora(pipe.dit, _cache(), settings, str(tmp_path / "fp32"), progress=False).state
    other_seed = train_round_lora(pipe.dit, _cache(), LoRATrainSettings(**{**settings.__dict__, "seed": 1}),
                                  str(tmp_path / "seed1"), progress=False).state
    hot_before = [len(m.lora_A_weights) for m in qpipe.dit.modules() if hasattr(m, "lora_A_weights")]
    quantised = train_round_lora(qpipe.dit, _cache(), settings, str(tmp_path / "int8"), progress=False).state
    assert _delta_difference(quantised, fp32) < 0.08
    assert _delta_difference(other_seed, fp32) > 0.5
    # LoRA_1 was hot-loaded under stage 2 and taken off again; no adapter is left
    assert [len(m.lora_A_weights) for m in qpipe.dit.modules() if hasattr(m, "lora_A_weights")] == hot_before
    assert not any("lora_" in n for n, _ in qpipe.dit.named_parameters())
    # the quantisation is in each stage's identity (and absent from the full-precision base's)
    for stage in ("stage1", "stage2"):
        assert json.loads((tmp_path / "int8" / stage / "stage.json").read_text())["base_quantize"] == INT8
        assert "base_quantize" not in json.loads((tmp_path / "fp32" / stage / "stage.json").read_text())


def test_a_micro_run_on_a_quantised_base_trains_a_lora_that_loads_into_the_unquantised_model(tmp_path):
    """The 24 GB path at micro size: an int8 base, 8-bit AdamW, an EMA and sample images."""
    pytest.importorskip("bitsandbytes")
    import artaug_ext
    from artaug_ext.recipe.runner import run_recipe

    path = micro_recipe(tmp_path / "q.toml", run={"quantize": INT8, "rounds": 1},
                        train={"optimizer": "adamw8bit", "ema_decay": 0.9, "sample_every": 2})
    out = tmp_path / "run"
    run_recipe(load_recipe(str(path)), str(out), progress=False)
    for stage in ("stage1", "stage2"):
        folder = out / "rounds" / "round-01" / stage
        record = json.loads((folder / "stage.json").read_text())
        assert record["base_quantize"] == INT8 and record["optimizer"] == "adamw8bit" and record["ema_decay"] == 0.9
        assert os.path.isfile(folder / "lora.safetensors")
        assert sorted(os.listdir(folder / "samples")) == ["samples.json"] + [
            f"step-{step:06d}-{i:02d}.png" for step in (2, 3) for i in range(2)]
    pipe = artaug_ext.load_pipeline("tiny-random", device="cpu")
    before = np.asarray(artaug_ext.generate(pipe, PROMPT, steps=2, height=64, width=64, progress=False))
    report = artaug_ext.load_lora(pipe, str(out / "final" / "lora.safetensors"))
    assert report.hotloaded == [] and len(report.merged) > 0  # merged exactly into the unquantised model
    after = np.asarray(artaug_ext.generate(pipe, PROMPT, steps=2, height=64, width=64, progress=False))
    assert not np.array_equal(after, before)


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8"], "--quantize 'int8' is not a DiffSynth quantisation method"),
    (["--text-encoders", "quantized"], "--text-encoders quantized needs --quantize METHOD"),
])
def test_the_cli_refuses_a_bad_quantisation_in_one_line_before_loading(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "artaug_ext.cli", "generate", "--prompt", PROMPT, "--model",
                           "tiny-random", "--out", str(tmp_path / "x.png"), *args], capture_output=True, text=True,
                          cwd=REPO, env=child_env(), timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists()
