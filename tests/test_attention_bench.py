"""The attention and DiT-step benchmarks run end to end in --dry-run mode (CPU, interpreter)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script,name", [("bench_attention.py", "flux_attention"), ("bench_flux_step.py", "flux_dit_step")])
def test_dry_run_writes_json(tmp_path, script, name):
    out = tmp_path / "r.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--out", str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["name"] == name and result["dry_run"] is True
    assert {"device", "torch", "triton", "rows", "figures"} <= set(result)
    assert result["rows"] and all("error" not in r for r in result["rows"])
    if name == "flux_dit_step":
        patched = [r for r in result["rows"] if r["variant"] == "patched"][0]
        assert patched["kernel_stats"]["kernel"] > 0 and patched["psnr_db"] >= 40
