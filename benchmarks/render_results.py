"""Render benchmarks/results/*.json (and the GPU test report) into benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import xml.etree.ElementTree as ET


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _flatten(figures: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in figures.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return out


def _tests(path: str) -> list[str]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return []
    a = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    lines = [f"GPU tests: {a['tests'] - a['failures'] - a['errors'] - a['skipped']} passed, "
             f"{a['failures'] + a['errors']} failed, {a['skipped']} skipped ({suite.get('time', '?')} s)", ""]
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            lines.append(f"- FAILED `{case.get('classname')}::{case.get('name')}`: {(bad.get('message') or '')[:300]}")
    return lines


def render(results_dir: str) -> str:
    docs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                docs.append(json.load(f))
        except (OSError, ValueError) as e:
            docs.append({"name": os.path.basename(path), "error": f"unreadable: {e}"})
    lines = ["# Benchmark results", "",
             f"Rendered {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by "
             "`benchmarks/render_results.py` from `benchmarks/results/*.json` (written by "
             "`benchmarks/device_check.sh`). Every ratio compares against a baseline measured in the "
             "same run on the same device.", ""]
    devices = {(d.get("device"), d.get("driver"), d.get("torch"), d.get("triton")) for d in docs if d.get("device")}
    for dev, driver, torch_v, triton_v in sorted(devices, key=str):
        lines.append(f"- device: **{dev}**, driver {driver or '?'}, torch {torch_v}, triton {triton_v}")
    lines.append("")
    lines += _tests(os.path.join(results_dir, "gpu_tests.xml"))
    for d in docs:
        lines += ["", f"## {d.get('name', '?')}" + (" (dry run, CPU)" if d.get("dry_run") else ""), ""]
        if d.get("error"):
            lines.append(f"error: {d['error']}")
            continue
        if d.get("notes"):
            lines += [str(n) for n in (d["notes"] if isinstance(d["notes"], list) else [d["notes"]])] + [""]
        if d.get("figures"):
            lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in _flatten(d["figures"]).items()] + [""]
        lines += _table(d.get("rows", []))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--out", default="benchmarks/RESULTS.md")
    args = ap.parse_args()
    text = render(args.results)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
