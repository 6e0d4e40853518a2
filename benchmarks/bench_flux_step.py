"""One FLUX.1-dev DiT step (DiffSynth's `model_fn_flux_image`, random bf16 weights, real
shapes: 19 joint + 38 single blocks, 3072 wide, 24 heads, 512 text tokens): eager vs
patched with the fused attention kernel, and regionally compiled (as
`pipe.compile_pipeline()` does) vs patched + compiled.

    python benchmarks/bench_flux_step.py --out benchmarks/results/flux_step.json [--no-compile]
    python benchmarks/bench_flux_step.py --out /tmp/s.json --dry-run   # tiny DiT on CPU, interpreter
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _inputs(torch, size, s_txt, text_dim, pooled_dim, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lat = size // 8

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return dict(
        latents=rnd(1, 16, lat, lat),
        timestep=torch.full((1,), 500.0, device=device, dtype=dtype),
        prompt_emb=rnd(1, s_txt, text_dim),
        pooled_prompt_emb=rnd(1, pooled_dim),
        guidance=torch.full((1,), 3.5, device=device, dtype=dtype),
        text_ids=torch.zeros(1, s_txt, 3, device=device, dtype=dtype),
    )


def _compare(a, b):
    a, b = a.double(), b.double()
    mse = (a - b).square().mean().item()
    peak = b.abs().max().item()
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "rel_l2": ((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
        "psnr_db": 10 * math.log10(peak * peak / mse) if mse > 0 else float("inf"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny DiT, CPU, Triton interpreter")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--time-budget", type=float, default=240.0,
                    help="seconds; compiled variants are skipped once this is spent")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before artaug_kernels is imported
    t_start = time.perf_counter()

    import torch
    import triton
    from diffsynth.pipelines.flux_image import model_fn_flux_image

    from artaug_ext import patch

    dry = args.dry_run
    if dry:
        from artaug_ext.tiny.models import TinyFluxDiT

        device, dtype = "cpu", torch.float32
        torch.manual_seed(0)
        dit = TinyFluxDiT().eval()
        inputs = _inputs(torch, 64, 7, 64, 32, device, dtype)
        iters = 1
    else:
        from diffsynth.models.flux_dit import FluxDiT

        device, dtype = "cuda", torch.bfloat16
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise directly in bf16 (about 24 GB)
        try:
            with torch.device(device):
                dit = FluxDiT().eval()
        finally:
            torch.set_default_dtype(default)
        inputs = _inputs(torch, args.size, 512, 4096, 768, device, dtype)
        iters = args.iters

    def step():
        with torch.no_grad():
            return model_fn_flux_image(dit=dit, **inputs)

    def timed(label, warmup=1):
        t0 = time.perf_counter()
        for _ in range(warmup):
            out = step()
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            out = step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        ms = 1e3 * sorted(times)[len(times) // 2]
        row = {"variant": label, "ms": ms, "warmup_s": first}
        print(json.dumps(row), flush=True)
        return out, row

    rows = []
    ref, row = timed("eager")
    rows.append(row)
    patch.reset_kernel_stats()
    patch.apply_kernels(dit)
    out, row = timed("patched")
    row.update(_compare(out, ref), kernel_stats=patch.kernel_stats())
    rows.append(row)
    patch.remove_kernels(dit)

    skipped = None
    if args.no_compile or dry:
        skipped = "--no-compile" if args.no_compile else "dry run"
    else:
        for m in dit.modules():  # regional compilation, as BasePipeline.compile_pipeline does
            if m.__class__.__name__ in dit._repeated_blocks:
                m.compile(dynamic=True)
        out, row = timed("compiled")
        row.update(_compare(out, ref))
        rows.append(row)
        if time.perf_counter() - t_start < args.time_budget:
            patch.reset_kernel_stats()  # this variant's calls only
            patch.apply_kernels(dit)
            out, row = timed("patched_compiled")
            row.update(_compare(out, ref), kernel_stats=patch.kernel_stats())
            rows.append(row)
            patch.remove_kernels(dit)
        else:
            skipped = "patched_compiled: time budget spent"

    by = {r["variant"]: r["ms"] for r in rows}
    figures = {"speedup_patched_vs_eager": by["eager"] / by["patched"]}
    if "compiled" in by:
        figures["speedup_compiled_vs_eager"] = by["eager"] / by["compiled"]
    if "patched_compiled" in by:
        figures["speedup_patched_compiled_vs_compiled"] = by["compiled"] / by["patched_compiled"]
        figures["speedup_patched_compiled_vs_eager"] = by["eager"] / by["patched_compiled"]
    if skipped:
        figures["skipped"] = skipped
    result = {
        "name": "flux_dit_step",
        "device": "cpu (interpreter)" if dry else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dry_run": dry,
        "shape": {"size": 64 if dry else args.size, "text_tokens": 7 if dry else 512},
        "rows": rows,
        "figures": figures,
    }
    if device == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
