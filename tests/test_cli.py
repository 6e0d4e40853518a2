"""`artaug` as a user runs it: subprocesses, network blocked (tests/netblock)."""

import time

import numpy as np
from helpers import make_fake_flux_dev, run_cli
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


def test_flux_dev_offline_fails_fast_with_fixes(tmp_path):
    t = time.perf_counter()
    r = run_cli("generate", "--model", "flux-dev", "--prompt", "x", "--out", str(tmp_path / "x.png"),
                env={"ARTAUG_HOME": str(tmp_path / "empty"), "MODELSCOPE_CACHE": str(tmp_path / "msc")})
    assert time.perf_counter() - t < 15  # includes interpreter start and imports
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert "black-forest-labs/FLUX.1-dev" in err[0] and "artaug download" in err[0] and "--model-dir" in err[0]


def test_bad_arguments_get_one_line_errors(tmp_path):
    cases = [
        (["generate", "--prompt", "x", "--height", "100"], "multiple of 16"),
        (["generate", "--prompt", "x", "--model", "sdxl"], "invalid choice"),
        (["generate"], "--prompt"),
        (["generate", "--prompt", "   "], "--prompt is empty"),
        (["generate", "--prompt", "x", "--artaug"], "--artaug needs a FLUX.1-dev model"),
        (["generate", "--prompt", "x", "--out", str(tmp_path / "nope" / "a.png")], "does not exist"),
    ]
    for args, expected in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, r.stderr)


def test_network_guard_reaches_subprocesses():
    import subprocess
    import sys

    code = "import socket\ntry:\n    socket.create_connection(('93.184.216.34', 80), timeout=5)\n    print('CONNECTED')\nexcept OSError as e:\n    print('BLOCKED', e)"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "BLOCKED" in r.stdout and time.perf_counter() - t < 10
