"""`benchmarks/device_check.sh --dry-run`: the GPU check's plumbing, on CPU."""

import json
import os
import subprocess

from helpers import REPO


def test_device_check_dry_run_writes_results(tmp_path):
    env = dict(os.environ, ARTAUG_RESULTS_DIR=str(tmp_path / "results"), ARTAUG_RESULTS_MD=str(tmp_path / "RESULTS.md"))
    r = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    written = sorted(os.listdir(tmp_path / "results"))
    assert written, r.stdout
    for name in written:
        doc = json.load(open(tmp_path / "results" / name))
        assert doc["dry_run"] is True and doc["rows"], name
    md = (tmp_path / "RESULTS.md").read_text()
    assert "# Benchmark results" in md and "dry run" in md
