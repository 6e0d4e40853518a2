"""What each trainer feature of the 24 GB path costs in wall time, against the same training without it.

One round of the batched differential LoRA (stage 1, LoRA_1 merged or hot-loaded, stage 2) on
the embedded tiny model, on the same latent cache, in one run, configurations alternated and
repeated (medians): the base configuration, then each feature alone, then all of them:

  quantize     the frozen DiT in DiffSynth's torchao int8 (`[run] quantize`): LoRA_1 hot-loaded
  adamw8bit    bitsandbytes' 8-bit AdamW (`[train] optimizer`)
  ema          an EMA of the LoRA weights (`[train] ema_decay`)
  samples      sample images every `--sample-every` steps (`[train] sample_every`)

Printed as seconds and the ratio to the base. On a GPU the ratios differ (int8 matmuls, bnb's
CUDA kernels); this is the CPU's, on the machine it runs on.

    python benchmarks/bench_trainer_features.py [--steps 20] [--repeats 3] [--json benchmarks/results/trainer_features_cpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

FEATURES = ("quantize", "adamw8bit", "ema", "samples")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=20, help="steps of each stage")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--sample-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from artaug_ext.pipeline import load_pipeline
    from artaug_ext.train.cache import LatentCache
    from artaug_ext.train.differential import train_round_lora
    from artaug_ext.train.samples import StageSampler
    from artaug_ext.train.settings import LoRATrainSettings

    pipes = {False: load_pipeline(args.model, device="cpu"),
             True: load_pipeline(args.model, device="cpu", quantize="torchao_int8_w8a16")}
    g = torch.Generator().manual_seed(0)
    n, lat = args.pairs, 32  # latents of 256-px images: the tiny model's generation size
    cache = LatentCache([f"p{i}" for i in range(n)], torch.randn(n, 16, lat, lat, generator=g),
                        torch.randn(n, 16, lat, lat, generator=g), torch.randn(n, 32, 64, generator=g),
                        torch.randn(n, 32, generator=g))
    base = LoRATrainSettings(rank=8, lr=2e-4, steps_stage1=args.steps, steps_stage2=args.steps, batch_size=4,
                             checkpoint_every=0)
    prompts = ["a red circle on a blue background", "a small green square in the top left on a white background"]

    def configuration(features: tuple[str, ...]):
        settings = dataclasses.replace(base, optimizer="adamw8bit" if "adamw8bit" in features else "adamw",
                                       ema_decay=0.95 if "ema" in features else None,
                                       sample_every=args.sample_every if "samples" in features else 0,
                                       sample_prompts=prompts if "samples" in features else None)
        pipe = pipes["quantize" in features]
        sampler = StageSampler(pipe, prompts, 0, steps=4, height=256, width=256) if "samples" in features else None
        return pipe, settings, sampler

    configs = {"base": ()} | {f: (f,) for f in FEATURES} | {"all": FEATURES}
    times: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, features in configs.items():
                pipe, settings, sampler = configuration(features)
                t0 = time.perf_counter()
                train_round_lora(pipe.dit, cache, settings, os.path.join(tmp, f"{name}-{repeat}"), progress=False,
                                 sampler=sampler)
                times[name].append(time.perf_counter() - t0)
                print(f"repeat {repeat + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(v) for name, v in times.items()}
    rows = [{"configuration": name, "seconds": round(medians[name], 3),
             "vs_base": round(medians[name] / medians["base"], 3)} for name in configs]
    for row in rows:
        print(f"{row['configuration']:>10}: {row['seconds']:7.2f} s  {row['vs_base']:.2f}x the base")
    result = {"name": "trainer_features", "device": "cpu", "threads": args.threads, "model": args.model,
              "round": f"batched, {args.steps} + {args.steps} steps, batch 4, rank 8, {n} pairs at 256 px",
              "samples": f"{len(prompts)} prompts every {args.sample_every} steps and at the last, 4 steps at 256 px",
              "repeats": args.repeats, "torch": torch.__version__, "rows": rows, "times": times}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
