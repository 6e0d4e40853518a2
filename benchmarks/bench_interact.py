"""How fast the interaction makes pairs on CPU: items a second of `artaug interact` on the tiny
model, one process with one and with two torch threads, and two processes (ranks, as torchrun
starts them) with one thread each, against the one-process one-thread run measured in the same
run; and what batching items through the DiT and the VAE would buy, per sample against batch 1.

    python benchmarks/bench_interact.py [--items 48] [--json benchmarks/results/interact_cpu.json]

Time it alone on the machine: every configuration shares the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = os.path.join(HERE, "..", "recipes", "tiny_artaug_prompts.txt")
LAUNCHES = (("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1))


def interact_seconds(prompts: str, world: int, threads: int) -> float:
    """Wall seconds of one `artaug interact` launch of `world` ranks, until every rank exits."""
    out = tempfile.mkdtemp(prefix="bench-interact-")
    cmd = [sys.executable, "-m", "artaug_ext.cli", "interact", "--prompts", prompts, "--out", out, "--model", "tiny",
           "--device", "cpu", "--threads", str(threads), "--no-progress", "--no-pictures"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if world > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    t = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)) if world > 1 else env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(world)]
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - t
    for p, err in zip(procs, errors, strict=True):
        if p.returncode:
            raise SystemExit(f"artaug interact failed ({p.returncode}): {err.decode(errors='replace')[-2000:]}")
    return seconds


def batch_costs(repeats: int = 3) -> dict:
    """Seconds a sample of one DiT forward (8 steps' worth is 8 of them) and of one VAE decode at
    batch 1, 2, 4, 8, one thread, the tiny model at 256 px."""
    import torch
    from bench_regional import captured_step

    from artaug_ext.pipeline import load_pipeline, t5_sequence_length

    torch.set_num_threads(1)
    pipe = load_pipeline("tiny", device="cpu")
    captured = captured_step(pipe, "a large red circle on the left and a small blue square on the right", 256,
                             t5_sequence_length("tiny"))
    model_fn = pipe.model_fn
    out = {"dit": {}, "vae_decode": {}}
    with torch.no_grad():
        for b in (1, 2, 4, 8):
            kw = dict(captured)
            for key in ("latents", "prompt_emb", "pooled_prompt_emb", "text_ids", "image_ids"):
                kw[key] = captured[key].expand(b, *captured[key].shape[1:]).contiguous()
            for key in ("timestep", "guidance"):
                kw[key] = captured[key].expand(b).contiguous()
            model_fn(**kw)
            t = time.perf_counter()
            for _ in range(repeats):
                model_fn(**kw)
            out["dit"][b] = (time.perf_counter() - t) / repeats / b
            latents = torch.randn(b, 16, 32, 32, generator=torch.Generator().manual_seed(0))
            pipe.vae_decoder(latents)
            t = time.perf_counter()
            for _ in range(repeats):
                pipe.vae_decoder(latents)
            out["vae_decode"][b] = (time.perf_counter() - t) / repeats / b
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=48, help="prompts of recipes/tiny_artaug_prompts.txt (one image each)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()
    from artaug_ext.eval.prompts import read_prompt_file

    lines = [item.prompt for item in read_prompt_file(PROMPTS)]
    if not 2 <= args.items <= len(lines):
        p.error(f"--items {args.items}: use 2 to {len(lines)} (the prompts of {PROMPTS})")
    folder = tempfile.mkdtemp(prefix="bench-interact-prompts-")
    prompts = os.path.join(folder, "prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.write("\n".join(lines[:args.items]) + "\n")
    figures = {"items": args.items, "launches": {}, "batch": {}}
    print(f"{'launch':<26}{'seconds':>9}{'items/s':>9}{'ratio':>7}   ({args.items} items, startup included)")
    base = None
    for name, world, threads in LAUNCHES:
        s = interact_seconds(prompts, world, threads)
        rate = args.items / s
        base = base or rate
        figures["launches"][name] = {"seconds": round(s, 1), "items_per_s": round(rate, 3), "ratio": round(rate / base, 2)}
        print(f"{name:<26}{s:>9.1f}{rate:>9.3f}{rate / base:>6.2f}x")
    costs = batch_costs()
    print(f"\n{'batch':<8}{'DiT s/sample':>14}{'ratio':>7}{'VAE decode s/image':>20}{'ratio':>7}   (one thread; ratio: batch 1 / batch b)")
    for b in (1, 2, 4, 8):
        dit, vae = costs["dit"][b], costs["vae_decode"][b]
        r_dit, r_vae = costs["dit"][1] / dit, costs["vae_decode"][1] / vae
        figures["batch"][b] = {"dit_s": round(dit, 4), "dit_speedup": round(r_dit, 2), "vae_decode_s": round(vae, 4),
                               "vae_speedup": round(r_vae, 2)}
        print(f"{b:<8}{dit:>14.4f}{r_dit:>6.2f}x{vae:>20.4f}{r_vae:>6.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
