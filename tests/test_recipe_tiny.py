"""recipes/train_tiny.py's DiT fine-tune for the word-order-keeping T5: the least-squares
refit of the text input layer, and micro runs end to end (exported files checked), of the
fine-tune and of a from-scratch run, which trains and exports with the same T5."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import torch
from safetensors.torch import load_file

from artaug_ext.tiny.trained import WEIGHT_FILES, asset_dir

REPO = pathlib.Path(__file__).resolve().parents[1]


def _recipe():
    spec = importlib.util.spec_from_file_location("train_tiny_recipe", REPO / "recipes" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refit_recovers_an_exact_linear_change():
    # New embeddings an invertible affine map of the old: the refit layer must reproduce
    # the old outputs (fp64 solve), which the unchanged layer does not.
    g = torch.Generator().manual_seed(0)
    layer_in, layer_out = 16, 24
    dit = torch.nn.Module()
    dit.context_embedder = torch.nn.Linear(layer_in, layer_out)
    old = torch.randn(50, 7, layer_in, generator=g)
    mix = torch.randn(layer_in, layer_in, generator=g) + 3 * torch.eye(layer_in)
    new = old @ mix + torch.randn(layer_in, generator=g)
    with torch.no_grad():
        expected = dit.context_embedder(old)
    report = _recipe().refit_context_embedder(dit, old, new)
    with torch.no_grad():
        got = dit.context_embedder(new)
    assert report["mse_before"] > 0.1 and report["mse_after"] < 1e-8, report
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _micro_run(tmp_path, *flags) -> dict:
    """Run the recipe with --micro and the given flags; the exported files by role."""
    env = {**os.environ, "ARTAUG_HOME": str(tmp_path / "home")}
    out = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "train_tiny.py"), "--micro", *flags, "--workers", "1",
         "--work-dir", str(tmp_path / "work"), "--export", str(out)],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "tokenizer_2" / "tokenizer.json").is_file()
    return {role: load_file(os.path.join(out, rel)) for role, rel in WEIGHT_FILES.items()}


def _assert_neighbour_bias(t5_file_state):
    bias = t5_file_state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    expected = torch.zeros_like(bias)
    expected[1, 0] = expected[17, 1] = 8.0
    assert torch.equal(bias, expected)


def test_micro_finetune_dit_exports_the_neighbour_t5(tmp_path):
    exported = _micro_run(tmp_path, "--finetune-dit")
    shipped = {role: load_file(os.path.join(asset_dir("tiny"), rel)) for role, rel in WEIGHT_FILES.items()}
    for role in ("vae", "text_encoder"):  # kept as shipped, bit for bit
        assert all(torch.equal(exported[role][k], shipped[role][k]) for k in shipped[role]), role
    _assert_neighbour_bias(exported["text_encoder_2"])
    assert set(exported["dit"]) == set(shipped["dit"])
    assert all(v.dtype == torch.float16 for v in exported["dit"].values())
    changed = [k for k in shipped["dit"] if not torch.equal(exported["dit"][k], shipped["dit"][k])]
    # txt_in is FLUX.1-dev's name of the refitted context_embedder; most other tensors trained too
    assert "txt_in.weight" in changed and len(changed) > len(shipped["dit"]) // 2


def test_micro_from_scratch_exports_the_t5_it_trained_with(tmp_path):
    exported = _micro_run(tmp_path)
    _assert_neighbour_bias(exported["text_encoder_2"])
    # tiny-random's text encoders with that bias: bit for bit what ships.
    shipped = {role: load_file(os.path.join(asset_dir("tiny"), WEIGHT_FILES[role]))
               for role in ("text_encoder", "text_encoder_2")}
    for role, state in shipped.items():
        assert set(exported[role]) == set(state), role
        assert all(torch.equal(exported[role][k], state[k]) for k in state), role
