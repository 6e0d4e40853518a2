"""Peak GPU memory of the 24 GB recipe's settings on FLUX.1-dev's DiT, against the dry run's plan.

FLUX.1-dev's DiT with random bf16 weights (19 joint + 38 single blocks, 3072 wide), quantised by
DiffSynth (`recipes/flux_dev_artaug_24gb.toml`'s `[run] quantize`) and wrapped for hot-loading
as `load_pipeline` does; then one generation step (DiT forward, no gradients) and one training
step of stage 2 (LoRA_1 and a round LoRA hot-loaded, a fresh LoRA at the recipe's rank, the
flow-matching loss with gradient checkpointing, backward, the recipe's optimiser step), each
with `torch.cuda.max_memory_allocated`. The plan's figures for the DiT alone (no text encoders,
no VAE: they are not loaded here) are printed beside them, and their ratio.

    python benchmarks/bench_quantized_memory.py --out benchmarks/results/quantized_memory.json
    python benchmarks/bench_quantized_memory.py --out /tmp/q.json --dry-run   # tiny DiT on CPU: the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(path: str):
    from artaug_ext.recipe.config import load_recipe

    return load_recipe(path)


def _planned(recipe, size: int) -> dict:
    """The plan's DiT-only GPU terms (weights of the DiT, hot-loaded factors, state, activations)."""
    from artaug_ext.flux_shapes import FLUX_DEV
    from artaug_ext.recipe.memory import GB, memory_plan

    t, r = recipe.train, recipe.run
    m = memory_plan(FLUX_DEV, targets=t.target_modules, rank=t.rank, dtype_bytes=2, device="cuda", train_px=size,
                    generate_px=size, text_tokens=512, batch_size=t.batch_size,
                    gradient_checkpointing=t.gradient_checkpointing, pairs=1, quantize=r.quantize,
                    text_encoders=r.text_encoders, optimizer=t.optimizer, ema=t.ema_decay is not None,
                    hot_loaded_round_loras=1)
    p = m.parts
    dit = p["DiT weights"]
    return {"dit_weights_gb": dit / GB,
            "generation_gb": (dit + p["generation activations"] + p["hot-loaded LoRAs (device)"] / 2) / GB,
            "training_gb": (dit + p["LoRA_2 training state"] + p["training activations"]
                            + p["hot-loaded LoRAs (device)"]) / GB}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", default=os.path.join(REPO, "recipes", "flux_dev_artaug_24gb.toml"))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--dry-run", action="store_true", help="the tiny DiT on the CPU (no memory figures)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import torch
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    from artaug_ext.lora import load_lora, unload_lora
    from artaug_ext.quant import quantize_config
    from artaug_ext.train.flow import FlowMatchObjective, FluxDenoiser
    from artaug_ext.train.loop import SampleRandom, TrainConfig, make_optimizer
    from artaug_ext.train.lora import inject_lora, lora_state_dict, remove_lora

    recipe = _recipe(args.recipe)
    t, method = recipe.train, recipe.run.quantize
    dry = args.dry_run
    if dry:
        from artaug_ext.tiny.models import TinyFluxDiT

        device, dtype, size, text, text_dim, pooled = "cpu", torch.float32, 64, 8, 64, 32
        torch.manual_seed(0)
        dit = TinyFluxDiT()
    else:
        from diffsynth.models.flux_dit import FluxDiT

        device, dtype, size, text, text_dim, pooled = "cuda", torch.bfloat16, args.size, 512, 4096, 768
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise directly in bf16 (about 24 GB) on the host
        try:
            dit = FluxDiT()
        finally:
            torch.set_default_dtype(default)
    config = quantize_config(method)
    config.quantize_model(dit, compute_device=device, model_device=device)  # a layer at a time onto the device
    dit.quantize_config = config  # what DiffSynth's loader sets on a model it quantised
    dit.to(device)
    pipe = FluxImagePipeline(device=device, torch_dtype=dtype)
    dit = pipe.enable_lora_hot_loading(dit)
    pipe.dit = dit
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gib = 2**30

    def measured() -> float:
        sync()
        return torch.cuda.max_memory_allocated() / gib if device == "cuda" else 0.0

    def reset() -> None:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    weights = torch.cuda.memory_allocated() / gib if device == "cuda" else 0.0
    # two LoRAs at the recipe's rank to hot-load: a round LoRA (the running base) and LoRA_1
    loras = []
    for seed in (1, 2):
        inject_lora(dit, t.rank, t.alpha, t.target_modules, init_seed=seed)
        loras.append({k.replace(".default.", "."): v for k, v in lora_state_dict(dit).items()})
        remove_lora(dit)
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    batch = {"latents": torch.randn(t.batch_size, 16, lat, lat, generator=g),
             "prompt_emb": torch.randn(t.batch_size, text, text_dim, generator=g),
             "pooled_prompt_emb": torch.randn(t.batch_size, pooled, generator=g)}
    batch = {k: v.to(device=device, dtype=dtype) for k, v in batch.items()}
    objective = FlowMatchObjective(weighting=t.weighting, guidance=t.guidance, sampling=t.timestep_sampling)
    running = load_lora(pipe, loras[0])

    reset()
    denoiser = FluxDenoiser(dit, use_gradient_checkpointing=t.gradient_checkpointing)
    with torch.no_grad():
        denoiser.eval()
        sigma_t = torch.full((t.batch_size,), 500.0, device=device, dtype=dtype)
        denoiser(batch["latents"], sigma_t, batch["prompt_emb"], batch["pooled_prompt_emb"],
                 torch.full((t.batch_size,), 3.5, device=device, dtype=dtype))
    generation = measured()

    reset()
    lora_1 = load_lora(pipe, loras[1])
    inject_lora(dit, t.rank, t.alpha, t.target_modules, init_seed=3)
    denoiser.train()
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, TrainConfig(output_dir="", steps=1, settings=t))
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = objective(denoiser, batch["latents"], batch["prompt_emb"], batch["pooled_prompt_emb"],
                         SampleRandom(0, list(range(t.batch_size))))
    loss.backward()
    optimizer.step()
    training = measured()
    if not torch.isfinite(loss):
        raise SystemExit(f"the training step's loss is {float(loss)}")
    remove_lora(dit)
    unload_lora(pipe, lora_1)
    unload_lora(pipe, running)

    planned = _planned(recipe, size) if not dry else {}
    rows = [{"step": "DiT weights (quantised)", "measured_gib": weights, "planned_gb": planned.get("dit_weights_gb")},
            {"step": "generation (DiT forward)", "measured_gib": generation, "planned_gb": planned.get("generation_gb")},
            {"step": "training (stage 2 step)", "measured_gib": training, "planned_gb": planned.get("training_gb")}]
    figures = {}
    if not dry:
        figures = {"generation_measured_over_planned": generation * gib / (planned["generation_gb"] * 1e9),
                   "training_measured_over_planned": training * gib / (planned["training_gb"] * 1e9)}
    result = {"name": "quantized_memory", "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(),
              "torch": torch.__version__, "dry_run": dry, "recipe": os.path.relpath(args.recipe, REPO),
              "quantize": method, "optimizer": t.optimizer, "rank": t.rank, "size": size,
              "rows": rows, "figures": figures, "loss": float(loss.detach()),
              "seconds": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({"rows": rows, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
