"""Training throughput: what the training loop costs on top of the DiT's own work.

For a LoRA stage on the embedded tiny DiT (rank 8, DiffSynth's FLUX targets), measured in the
same run on the same cached batch:
  bare   the flow-matching loss forward + backward through the DiT, nothing else (the floor)
  loop   `artaug_ext.train.train`: data from the latent cache, per-sample randomness, autocast,
         backward, gradient clipping, AdamW, LR schedule, the loss log (one fsync'd line a step)
Reported per optimizer step (medians of alternating repeats), with loop / bare - 1 as the loop's and data's overhead (target
<= 15%), at the demo's batch (4 at 128 px) and at batch 1 / 64 px, where fixed costs show.

    python benchmarks/bench_train.py [--steps 30] [--json benchmarks/results/train_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def measure(pipe, batch: int, size: int, steps: int, repeats: int) -> dict:
    import torch

    from artaug_ext.train import (
        FlowMatchObjective,
        FluxDenoiser,
        SampleRandom,
        TrainConfig,
        TrainSettings,
        inject_lora,
        remove_lora,
        train,
    )
    from artaug_ext.train.cache import LatentCache

    g = torch.Generator().manual_seed(0)
    n, lat = 16, size // 8
    cache = LatentCache([str(i) for i in range(n)], torch.randn(n, 16, lat, lat, generator=g),
                        torch.randn(n, 16, lat, lat, generator=g), torch.randn(n, 32, 64, generator=g),
                        torch.randn(n, 32, generator=g))
    dit = pipe.dit
    inject_lora(dit, rank=8, init_seed=0)
    try:
        denoiser = FluxDenoiser(dit).train()
        objective = FlowMatchObjective()
        params = [p for p in dit.parameters() if p.requires_grad]
        fixed = cache.batch("enhanced", list(range(batch)))
        rng_keys = list(range(batch))

        def bare_step():
            loss = objective(denoiser, fixed["latents"], fixed["prompt_emb"], fixed["pooled_prompt_emb"],
                             SampleRandom(0, rng_keys))
            loss.backward()
            for p in params:
                p.grad = None

        def loss_fn(model, b, rng):
            return objective(model, b["latents"], b["prompt_emb"], b["pooled_prompt_emb"], rng)

        bare, loop = [], []
        for _ in range(2):  # warm-up
            bare_step()
        for r in range(repeats):
            t = time.perf_counter()
            for _ in range(steps):
                bare_step()
            bare.append((time.perf_counter() - t) / steps)
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(os.path.join(tmp, f"s{r}"), steps=steps,
                                  settings=TrainSettings(batch_size=batch, lr=1e-4, checkpoint_every=0, schedule="constant"),
                                  betas=(0.9, 0.999), min_lr_ratio=0.05, progress=False, log_every=0)
                result = train(denoiser, loss_fn, lambda idx: cache.batch("enhanced", idx), n, cfg)
                loop.append(result.seconds / steps)
    finally:
        remove_lora(dit)
    import statistics

    b, lo = statistics.median(bare), statistics.median(loop)  # alternating repeats: a shared CPU drifts
    return {"batch": batch, "size": size, "steps": steps, "repeats": repeats, "bare_s": round(b, 5),
            "loop_s": round(lo, 5), "overhead": round(lo / b - 1, 4),
            "overhead_per_repeat": [round(x / y - 1, 4) for x, y in zip(loop, bare, strict=True)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from artaug_ext.pipeline import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", torch_dtype=torch.float32)
    rows = [measure(pipe, 4, 128, args.steps, args.repeats), measure(pipe, 1, 64, args.steps * 2, args.repeats)]
    info = {"device": f"CPU, {args.threads} torch threads", "torch": torch.__version__, "rows": rows}
    print(f"{'batch':>6}{'size':>6}{'bare s/step':>14}{'loop s/step':>14}{'overhead':>10}   (medians; per repeat)")
    for r in rows:
        each = " ".join(f"{x:+.0%}" for x in r["overhead_per_repeat"])
        print(f"{r['batch']:>6}{r['size']:>6}{r['bare_s']:>14.4f}{r['loop_s']:>14.4f}{r['overhead']:>10.1%}   {each}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
