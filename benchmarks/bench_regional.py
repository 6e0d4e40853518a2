"""Cost of ArtAug's regional blend per denoising step, relative to a plain FLUX step.

For each number of regions R it times, on the same captured step inputs:
  plain      one DiT call, batch 1 (what `pipe(...)` does per step)
  batched    our blend: ONE DiT call at batch 1+R, then the mask-weighted average
  sequential 1+R DiT calls at batch 1 (what DiffSynth 1.x's local prompts did), same blend
and reports the time ratios to `plain` and the max |batched - sequential| (fp32 on CPU).

    python benchmarks/bench_regional.py --out benchmarks/results/regional.json [--dry-run]
    python benchmarks/bench_regional.py --model flux-dev --size 1024 --regions 1 2 4   # on a GPU

Needs diffsynth (the pipeline's model_fn is what is timed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time

import torch

log = logging.getLogger("bench_regional")


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device, repeats, warmup):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def captured_step(pipe, prompt, size, t5_len):
    """model_fn keyword arguments of the first step of a real generation."""
    seen, original = [], pipe.model_fn

    def spy(**kw):
        seen.append(dict(kw))
        return original(**kw)

    pipe.model_fn = spy
    try:
        pipe(prompt=prompt, seed=0, num_inference_steps=1, height=size, width=size, t5_sequence_length=t5_len,
             progress_bar_cmd=lambda x: x)
    finally:
        pipe.model_fn = original
    return seen[0]


def main(argv=None) -> int:
    from artaug_ext.interact.enhance import RegionalModelFn, prepare_regions
    from artaug_ext.interact.parse import Suggestion
    from artaug_ext.pipeline import default_size, load_pipeline, t5_sequence_length

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random", help="tiny-random, tiny or flux-dev (default tiny-random)")
    ap.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    ap.add_argument("--regions", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dry-run", action="store_true", help="64px, 2 regions, 1 repeat: proves the plumbing in seconds")
    ap.add_argument("--out", default="benchmarks/results/regional.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    size = 64 if args.dry_run else (args.size or default_size(args.model))
    regions_list = [2] if args.dry_run else args.regions
    repeats, warmup = (1, 0) if args.dry_run else (args.repeats, args.warmup)

    pipe = load_pipeline(args.model, device=device, torch_dtype=dtype)
    t5_len = t5_sequence_length(args.model)
    prompt = "a red circle on a blue background, dim light"
    kw = captured_step(pipe, prompt, size, t5_len)
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0), (0.25, 0.0, 0.75, 0.4), (0.0, 0.6, 0.4, 1.0),
             (0.6, 0.0, 1.0, 0.4), (0.3, 0.3, 0.7, 0.7), (0.0, 0.3, 0.3, 0.7), (0.7, 0.3, 1.0, 0.7)]
    rows, figures = [], {}
    with torch.no_grad():
        plain = _time(lambda: pipe.model_fn(**kw), device, repeats, warmup)
        for r in regions_list:
            sugg = [Suggestion(boxes[i % len(boxes)], f"bright light, vivid colors {i}") for i in range(r)]
            regions = prepare_regions(pipe, sugg, size, size, t5_len)
            batched_fn = RegionalModelFn(pipe.model_fn, regions, kw["prompt_emb"], batched=True)
            seq_fn = RegionalModelFn(pipe.model_fn, regions, kw["prompt_emb"], batched=False)
            err = (batched_fn(**kw).float() - seq_fn(**kw).float()).abs().max().item()
            t_b = _time(lambda f=batched_fn: f(**kw), device, repeats, warmup)
            t_s = _time(lambda f=seq_fn: f(**kw), device, repeats, warmup)
            row = {"regions": r, "size": size, "dtype": str(dtype).replace("torch.", ""), "plain_ms": round(plain * 1e3, 3),
                   "batched_ms": round(t_b * 1e3, 3), "sequential_ms": round(t_s * 1e3, 3),
                   "batched_over_plain": round(t_b / plain, 3), "sequential_over_plain": round(t_s / plain, 3),
                   "max_abs_diff_batched_vs_sequential": err}
            rows.append(row)
            figures[f"batched_over_plain_r{r}"] = row["batched_over_plain"]
            figures[f"sequential_over_plain_r{r}"] = row["sequential_over_plain"]
            log.info("R=%d %dpx: plain %.1f ms, batched %.1f ms (x%.2f), sequential %.1f ms (x%.2f), max diff %.2e",
                     r, size, plain * 1e3, t_b * 1e3, t_b / plain, t_s * 1e3, t_s / plain, err)
    figures["max_abs_diff_batched_vs_sequential"] = max(r["max_abs_diff_batched_vs_sequential"] for r in rows)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {"name": "regional", "model": args.model,
              "device": torch.cuda.get_device_name(device) if device.startswith("cuda")
              else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "torch": torch.__version__, "triton": triton_version, "dry_run": bool(args.dry_run),
              "rows": rows, "figures": figures}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    log.info("wrote %s: %s", args.out, json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
