"""`artaug` as a user runs it: subprocesses, network blocked (tests/netblock)."""

import os
import time

import numpy as np
from helpers import REPO, make_fake_flux_dev, run_cli
from PIL import Image


def test_generate_tiny_writes_png(tmp_path):
    out = tmp_path / "a.png"
    r = run_cli("generate", "--model", "tiny", "--prompt", "a red circle on a blue background", "--out", str(out),
                "--height", "64", "--width", "96", "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (96, 64)
    assert "wrote" in r.stdout


def test_generate_flux_dev_from_model_dir_end_to_end(tmp_path):
    make_fake_flux_dev(str(tmp_path / "root"))
    out = tmp_path / "f.png"
    r = run_cli("generate", "--model", "flux-dev", "--no-artaug", "--model-dir", str(tmp_path / "root"),
                "--prompt", "a red circle", "--out", str(out), "--height", "64", "--width", "64", "--steps", "2",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(out))
    assert img.shape == (64, 64, 3)


_PROBE = """
import sys
from artaug_ext.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print("heavy imports:", sorted(m for m in ("torch", "diffsynth") if m in sys.modules), file=sys.stderr)
sys.exit(rc)
"""


def _probe(*args, env=None):
    """Run `artaug ARGS` in a fresh interpreter and report which heavy modules it imported."""
    import subprocess
    import sys

    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=full, timeout=120)


def test_help_version_and_argument_errors_import_neither_torch_nor_diffsynth():
    for args, rc in ((["--help"], 0), (["--version"], 0), (["generate", "--help"], 0), (["generat"], 2),
                     (["generate", "--prompt", "x", "--height", "100"], 2),
                     (["generate", "--prompt", "x", "--guidance", "nan"], 2),
                     (["run", os.path.join(REPO, "recipes", "smoke.toml"), "--dry-run"], 0)):
        r = _probe(*args)
        assert r.returncode == rc, (args, r.stderr)
        assert "heavy imports: []" in r.stderr, (args, r.stderr)
    assert "artaug-ext 0.1.0" in _probe("--version").stdout


def test_flux_dev_offline_error_comes_before_torch_with_the_fixes(tmp_path):
    r = _probe("generate", "--model", "flux-dev", "--prompt", "x", "--out", str(tmp_path / "x.png"),
               env={"ARTAUG_HOME": str(tmp_path / "empty"), "MODELSCOPE_CACHE": str(tmp_path / "msc")})
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 2 and "Traceback" not in r.stderr and err[1] == "heavy imports: []", r.stderr
    assert "black-forest-labs/FLUX.1-dev" in err[0] and "artaug download" in err[0] and "--model-dir" in err[0]


def test_bad_arguments_get_one_line_errors(tmp_path, capsys):
    # In-process (the subprocess path is covered above): each case must exit 2 with one stderr line.
    from artaug_ext.cli import main

    cases = [
        (["generate", "--prompt", "x", "--height", "100"], "multiple of 16"),
        (["generate", "--prompt", "x", "--model", "sdxl"], "invalid choice"),
        (["generate"], "--prompt"),
        (["generate", "--prompt", "   "], "--prompt is empty"),
        (["generate", "--prompt", "x", "--artaug"], "--artaug needs a FLUX.1-dev model"),
        (["generate", "--prompt", "x", "--out", str(tmp_path / "nope" / "a.png")], "does not exist"),
        (["generate", "--prompt", "x", "--steps", "0"], "must be positive"),
        (["generate", "--prompt", "x", "--out", str(tmp_path / "a.xyz")], "unknown image format '.xyz'"),
    ]
    for args, expected in cases:
        try:
            rc = main(args)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, err)


def test_network_guard_reaches_subprocesses():
    import subprocess
    import sys

    code = "import socket\ntry:\n    socket.create_connection(('93.184.216.34', 80), timeout=5)\n    print('CONNECTED')\nexcept OSError as e:\n    print('BLOCKED', e)"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "BLOCKED" in r.stdout and time.perf_counter() - t < 10


def _tiny_artaug_lora(path):
    """A kohya-format ("universal FLUX") LoRA for the tiny DiT, like the released ArtAug file."""
    import os

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, (out_f, in_f) in {"double_blocks_0_img_attn_qkv": (384, 128), "single_blocks_1_linear1": (896, 128),
                                "img_in": (128, 64)}.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g).to(torch.bfloat16)
        sd[f"lora_unet_{name}.lora_up.weight"] = (torch.randn(out_f, 4, generator=g) * 0.5).to(torch.bfloat16)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)


def test_generate_flux_dev_with_artaug_merges_the_lora(tmp_path):
    root = tmp_path / "root"
    make_fake_flux_dev(str(root))
    _tiny_artaug_lora(str(root / "DiffSynth-Studio" / "ArtAug-lora-FLUX.1dev-v1" / "merged_lora.safetensors"))
    common = ["generate", "--model", "flux-dev", "--model-dir", str(root), "--prompt", "a red circle",
              "--height", "64", "--width", "64", "--steps", "2", "--device", "cpu"]
    r1 = run_cli(*common, "--no-artaug", "--out", str(tmp_path / "base.png"))
    r2 = run_cli(*common, "--artaug", "--out", str(tmp_path / "artaug.png"))
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert "3 layers merged" in r2.stderr
    a = np.asarray(Image.open(tmp_path / "base.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "artaug.png")).astype(int)
    assert np.abs(a - b).mean() > 0.5


def test_generate_with_kernels_in_interpreter_matches_plain(tmp_path):
    common = ["generate", "--model", "tiny-random", "--prompt", "a red circle", "--height", "64", "--width", "64",
              "--steps", "2"]
    r1 = run_cli(*common, "--no-kernels", "--out", str(tmp_path / "plain.png"))
    r2 = run_cli(*common, "--kernels", "--out", str(tmp_path / "fused.png"), env={"TRITON_INTERPRET": "1"})
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert "'kernel': 12" in r2.stderr  # 2 steps x (2 joint + 4 single blocks): no fallback
    a = np.asarray(Image.open(tmp_path / "plain.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "fused.png")).astype(int)
    assert np.abs(a - b).max() <= 1  # fp32 pipeline: same image up to 8-bit rounding


def test_interact_subcommand_through_artaug(tmp_path):
    import json

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a blue background, dim light\n")
    r = run_cli("interact", "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--model", "tiny-random",
                "--size", "64", "--steps", "2", "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (tmp_path / "run").glob("**/*.jsonl").__next__().read_text().splitlines() if x]
    assert lines and lines[0]["prompt"].startswith("a red circle")
    r = run_cli("interact", "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run2"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "missing.txt" in r.stderr


def test_kernel_patch_refused_by_diffsynth(monkeypatch, caplog):
    """A DiffSynth the patch was not written for: an error with the fix under --kernels,
    a warning (DiffSynth's attention, no speed-up) when the kernels were on by default."""
    import logging

    import pytest

    from artaug_ext import patch
    from artaug_ext.cli.generate import apply_kernels
    from artaug_ext.errors import UsageError

    def refuse():
        raise patch.KernelPatchError("methods differ. Not patching; run without kernels (--no-kernels).")

    monkeypatch.setattr(patch, "check_diffsynth_compat", refuse)

    class Pipe:
        device = "cuda"

    with pytest.raises(UsageError, match="--no-kernels"):
        apply_kernels(Pipe(), requested=True)
    with caplog.at_level(logging.WARNING):
        apply_kernels(Pipe(), requested=False)
    assert "methods differ" in caplog.text and "DiffSynth's own attention runs instead" in caplog.text
