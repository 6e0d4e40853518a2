"""`benchmarks/bench_lora_merge.py --dry-run` runs on CPU and writes the agreed JSON."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_dry_run(tmp_path):
    out = tmp_path / "lora_merge.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the torch path: what a CPU user gets
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_lora_merge.py"), "--dry-run",
                    "--out", str(out)], check=True, env=env, cwd=ROOT, timeout=240)
    data = json.loads(out.read_text())
    assert data["name"] == "lora_merge" and data["dry_run"] is True
    assert {"device", "torch", "triton", "rows", "figures"} <= set(data)
    methods = {r.get("method") for r in data["rows"] if r["kind"] == "model"}
    assert {"artaug", "diffsynth_fp32", "diffsynth_bf16", "peft"} <= methods
    assert data["figures"]["model_misrounded_artaug"] <= 1e-4
    assert data["figures"]["model_misrounded_diffsynth_bf16"] > 1e-3  # two roundings
    assert all(r["misrounded"] <= 1e-3 for r in data["rows"] if r["kind"] == "shape")
