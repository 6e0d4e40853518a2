"""benchmarks/bench_regional.py --dry-run writes the agreed JSON shape."""

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_regional_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_regional", os.path.join(REPO, "benchmarks", "bench_regional.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "regional.json"
    assert mod.main(["--dry-run", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"name", "device", "torch", "triton", "dry_run", "rows", "figures"} <= set(result)
    assert result["name"] == "regional" and result["dry_run"] is True
    assert result["figures"]["max_abs_diff_batched_vs_sequential"] < 1e-5
    assert result["rows"][0]["batched_ms"] > 0
