"""Benchmark the exact LoRA merge against a device copy, DiffSynth's merge and PEFT's merge.

GPU: FLUX layer shapes (effective GB/s, % of a same-bytes device copy timed in the same run,
CUDA events, warm) and the whole FLUX.1-dev DiT at rank 64 (random bf16 weights built on the
GPU). CPU: the same shapes and 2 joint + 4 single full-width blocks. `--dry-run`: tiny
shapes on CPU in seconds, same JSON. Each method's mis-rounded fraction is measured against
fp64 on one layer restored to its original values first.

    python benchmarks/bench_lora_merge.py --out benchmarks/results/lora_merge.json [--dry-run]
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
from artaug_kernels import interpreter_mode
from artaug_kernels.lora_merge import lora_merge_, lora_merge_grouped_, lora_merge_reference, rounding_stats

log = logging.getLogger("bench_lora_merge")

FLUX_SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (3072, 15360)]


def dit_layers(dim: int, joint: int, single: int, embedders: bool) -> list[tuple[str, int, int]]:
    """(DiffSynth module name, out, in) of a FLUX.1 DiT's linear layers."""
    out = []
    for i in range(joint):
        p = f"blocks.{i}."
        out += [(p + "norm1_a.linear", 6 * dim, dim), (p + "norm1_b.linear", 6 * dim, dim),
                (p + "attn.a_to_qkv", 3 * dim, dim), (p + "attn.b_to_qkv", 3 * dim, dim),
                (p + "attn.a_to_out", dim, dim), (p + "attn.b_to_out", dim, dim),
                (p + "ff_a.0", 4 * dim, dim), (p + "ff_a.2", dim, 4 * dim),
                (p + "ff_b.0", 4 * dim, dim), (p + "ff_b.2", dim, 4 * dim)]
    for i in range(single):
        p = f"single_blocks.{i}."
        out += [(p + "norm.linear", 3 * dim, dim), (p + "to_qkv_mlp", 7 * dim, dim), (p + "proj_out", dim, 5 * dim)]
    if embedders:
        out += [("x_embedder", dim, 64), ("context_embedder", dim, 4096),
                ("time_embedder.timestep_embedder.0", dim, 256), ("time_embedder.timestep_embedder.2", dim, dim),
                ("guidance_embedder.timestep_embedder.0", dim, 256), ("guidance_embedder.timestep_embedder.2", dim, dim),
                ("pooled_text_embedder.0", dim, 768), ("pooled_text_embedder.2", dim, dim),
                ("final_norm_out.linear", 2 * dim, dim), ("final_proj_out", 64, dim)]
    return out


def build_tree(layers, device, dtype) -> torch.nn.Module:
    """A module tree with DiffSynth's names, bias-free linears, weights ~ N(0, 0.02)."""
    root = torch.nn.Module()
    for name, o, i in layers:
        parent = root
        parts = name.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        lin = torch.nn.utils.skip_init(torch.nn.Linear, i, o, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
        parent.add_module(parts[-1], lin)
    return root


def make_lora(layers, rank, device, seed=0):
    """Per layer (A, B) in bf16, delta about a tenth of the weights' scale."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, o, i in layers:
        a = torch.randn(rank, i, generator=g, device=device) / rank ** 0.25
        b = torch.randn(o, rank, generator=g, device=device) * (0.002 / rank ** 0.25)
        out[name] = (a.to(torch.bfloat16), b.to(torch.bfloat16))
    return out


def timer(fn, device, reps, warmup=1) -> float:
    """Median milliseconds of fn() (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def misrounded(module: torch.nn.Module, original: torch.Tensor, a, b, scale=1.0) -> float:
    exact = lora_merge_reference(original, a, b, scale)
    return rounding_stats(module.weight.data, exact)["misrounded"]


def bench_shapes(shapes, rank, device, reps, rows, figures):
    for o, i in shapes:
        w = (torch.randn(o, i, device=device) * 0.02).to(torch.bfloat16)
        (a, b), = make_lora([("w", o, i)], rank, device).values()
        original = w.clone()
        lora_merge_(w, a, b)
        mis = rounding_stats(w, lora_merge_reference(original, a, b))["misrounded"]
        ms = timer(lambda w=w, a=a, b=b: lora_merge_(w, a, b), device, reps)
        moved = 2 * w.numel() * w.element_size() + (a.numel() + b.numel()) * 2
        row = {"kind": "shape", "shape": [o, i], "rank": rank, "dtype": "bf16", "ms": ms,
               "gbps": moved / ms / 1e6, "misrounded": mis}
        if device.type == "cuda":
            dst = torch.empty_like(w)
            copy_ms = timer(lambda dst=dst, w=w: dst.copy_(w), device, reps)
            row["copy_gbps"] = 2 * w.numel() * w.element_size() / copy_ms / 1e6
            row["pct_copy"] = 100 * row["gbps"] / row["copy_gbps"]
            figures[f"pct_copy_{o}x{i}"] = round(row["pct_copy"], 1)
        figures[f"gbps_{o}x{i}"] = round(row["gbps"], 1)
        rows.append(row)
        log.info("%s", row)


def bench_model(layers, rank, device, dtype, reps, rows, figures, label):
    """Whole-model merge: ours vs DiffSynth's fuse and PEFT's merge, with mis-rounding."""
    tree = build_tree(layers, device, dtype)
    lora = make_lora(layers, rank, device)
    probe = next(n for n, _, _ in layers if n.endswith("a_to_qkv")) if any(
        n.endswith("a_to_qkv") for n, _, _ in layers) else layers[0][0]
    pmod = tree.get_submodule(probe)
    original = pmod.weight.data.clone()
    pa, pb = lora[probe]
    n_params = sum(o * i for _, o, i in layers)
    bytes_moved = 2 * n_params * torch.tensor([], dtype=dtype).element_size()

    def restore_probe():
        pmod.weight.data.copy_(original)

    mods = [tree.get_submodule(n) for n, _, _ in layers]

    def ours():
        lora_merge_grouped_([m.weight.data for m in mods], [[(lora[n][0], lora[n][1], 1.0)] for n, _, _ in layers])

    restore_probe()
    ours()
    mis = misrounded(pmod, original, pa, pb)
    ms = timer(ours, device, reps, warmup=0)
    rows.append({"kind": "model", "model": label, "method": "artaug", "layers": len(layers), "params": n_params,
                 "rank": rank, "ms": ms, "gbps": bytes_moved / ms / 1e6, "misrounded": mis})
    figures.update({"model_ms_artaug": round(ms, 2), "model_misrounded_artaug": mis})
    log.info("%s", rows[-1])

    try:
        from diffsynth.utils.lora.flux import FluxLoRALoader
    except ImportError as e:
        rows.append({"kind": "model", "model": label, "method": "diffsynth", "skipped": f"diffsynth missing: {e}"})
    else:
        for ddtype in ([torch.float32] if device.type == "cpu" else []) + [dtype]:
            loader = FluxLoRALoader(torch_dtype=ddtype, device=device)

            def fresh():
                return {f"{n}.lora_{k}.weight": t.clone() for n, (a, b) in lora.items()
                        for k, t in (("A", a), ("B", b))}

            def diffsynth(sd, loader=loader):
                loader.fuse_lora_to_base_model(tree, sd, alpha=1.0)

            restore_probe()
            _quiet(diffsynth, fresh())
            dmis = misrounded(pmod, original, pa, pb)
            times = []
            for _ in range(max(1, reps // 2)):
                sd = fresh()  # DiffSynth may rescale the LoRA in place: a fresh copy each time
                times.append(timer(lambda sd=sd: _quiet(diffsynth, sd), device, 1, warmup=0))
            dms = statistics.median(times)
            tag = "fp32" if ddtype == torch.float32 else "bf16"
            rows.append({"kind": "model", "model": label, "method": f"diffsynth_{tag}", "ms": dms,
                         "gbps": bytes_moved / dms / 1e6, "misrounded": dmis})
            figures[f"model_ms_diffsynth_{tag}"] = round(dms, 2)
            figures[f"model_misrounded_diffsynth_{tag}"] = dmis
            figures[f"speedup_vs_diffsynth_{tag}"] = round(dms / ms, 2)
            log.info("%s", rows[-1])

    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        rows.append({"kind": "model", "model": label, "method": "peft", "skipped": f"peft missing: {e}"})
    else:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=[n for n, _, _ in layers]), tree)
        peft_layers = []
        with torch.no_grad():
            for n, _, _ in layers:
                m = tree.get_submodule(n)
                m.lora_A["default"].weight.copy_(lora[n][0])
                m.lora_B["default"].weight.copy_(lora[n][1])
                peft_layers.append(m)
        pm = tree.get_submodule(probe)

        def peft_merge():
            for m in peft_layers:
                m.merge()

        def peft_cycle():
            for m in peft_layers:
                m.unmerge()
            peft_merge()

        pm.base_layer.weight.data.copy_(original)
        peft_merge()
        pmis = misrounded(pm.base_layer, original, pa, pb)
        pms = timer(peft_cycle, device, max(1, reps // 2), warmup=0)
        rows.append({"kind": "model", "model": label, "method": "peft", "ms_merge_plus_unmerge": pms,
                     "misrounded": pmis, "note": "PEFT merge timed with an unmerge before it (merge refuses twice)"})
        figures["model_ms_peft_merge_unmerge"] = round(pms, 2)
        figures["model_misrounded_peft"] = pmis
        log.info("%s", rows[-1])


def _quiet(fn, *args):
    """DiffSynth prints a line per fuse; keep the benchmark's output readable."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/lora_merge.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, seconds")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.dry_run:
        shapes, layers, rank, reps, label = [(64, 48), (96, 130)], dit_layers(64, 2, 4, True), 8, 2, "tiny dim-64 DiT"
    elif device.type == "cuda":
        shapes, layers, rank, reps, label = FLUX_SHAPES, dit_layers(3072, 19, 38, True), args.rank, 10, "FLUX.1-dev DiT"
    else:
        shapes, layers, rank, reps, label = FLUX_SHAPES, dit_layers(3072, 2, 4, False), args.rank, 3, \
            "FLUX.1 2 joint + 4 single blocks"
    reps = args.reps or reps
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {"name": "lora_merge",
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "torch": torch.__version__, "triton": triton_version, "dry_run": bool(args.dry_run),
              "interpreter": interpreter_mode(),
              "rows": [], "figures": {}}
    torch.manual_seed(0)
    bench_shapes(shapes, rank, device, reps, result["rows"], result["figures"])
    bench_model(layers, rank, device, torch.bfloat16, reps, result["rows"], result["figures"], label)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    log.info("wrote %s: %s", args.out, json.dumps(result["figures"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
