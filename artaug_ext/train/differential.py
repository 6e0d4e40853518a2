"""Differential LoRA: the learning step of ArtAug.

Stage 1 fits LoRA_1 to the ORIGINAL images of the kept pairs; LoRA_1 is merged into the
base with the exact merge; stage 2 trains LoRA_2 on the ENHANCED images of the same pairs on
top; LoRA_1 is unmerged bit for bit and thrown away. LoRA_2 learns what separates the
enhanced images from the originals ("less like the original, more like the enhanced"),
not the content both share. Modes:

- `batched`: one LoRA_1 and one LoRA_2 over all kept pairs;
- `per-pair`: a LoRA_1 / LoRA_2 per pair (DiffSynth's Differential_LoRA recipe), the LoRA_2s
  averaged exactly (rank concatenation / N) and truncated to the target rank, the retained
  energy reported;
- `sft`: the ablation, one LoRA trained on the enhanced images only.

Every stage writes into its own folder (checkpoints, loss.jsonl, and lora.safetensors last),
so a run killed anywhere resumes at the stage and step where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import asdict, dataclass

import torch

from ..errors import UsageError
from ..files import atomic_write_json, check_safetensors
from .cache import LatentCache
from .flow import FlowMatchObjective, FluxDenoiser
from .loop import TrainConfig, train
from .lora import inject_lora, lora_state_dict, remove_lora, save_lora
from .loss_log import read_loss_log
from .settings import MODES, LoRATrainSettings  # noqa: F401  (MODES: part of this module's API)

logger = logging.getLogger(__name__)

LORA_FILE = "lora.safetensors"


@dataclass
class RoundLoRA:
    """A round's trained LoRA (training format, alpha folded) and what training measured."""

    state: dict[str, torch.Tensor]
    path: str
    info: dict


def _losses(folder: str) -> list[float]:
    """The per-step losses of a stage, from its loss log."""
    return [r["loss"] for r in read_loss_log(folder)]


def _stage_done(folder: str) -> bool:
    path = os.path.join(folder, LORA_FILE)
    if not os.path.isfile(path):
        return False
    check_safetensors(path, "delete the stage folder; the next run trains the stage again")
    return True


def train_stage(dit: torch.nn.Module, cache: LatentCache, image_side: str, settings: LoRATrainSettings, folder: str,
                seed: int, steps: int, accelerator=None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Train one LoRA on the `image_side` images of `cache` on top of the DiT as it is; returns it
    (training format). A stage whose lora.safetensors exists is not trained again. The
    adapters are removed again before returning, so the DiT's module tree is unchanged."""
    from safetensors.torch import load_file

    if _stage_done(folder):
        return load_file(os.path.join(folder, LORA_FILE))
    inject_lora(dit, settings.rank, settings.alpha, settings.target_modules, init_seed=seed)
    try:
        denoiser = FluxDenoiser(dit, use_gradient_checkpointing=settings.gradient_checkpointing)
        objective = FlowMatchObjective(weighting=settings.weighting, guidance=settings.guidance,
                                       sampling=settings.timestep_sampling)
        dtype = next(dit.parameters()).dtype

        def loss_fn(model, batch, rng):
            return objective(model, batch["latents"], batch["prompt_emb"], batch["pooled_prompt_emb"], rng)

        def get_batch(indices):
            return {k: v.to(dtype) for k, v in cache.batch(image_side, indices).items()}

        cfg = TrainConfig(output_dir=folder, steps=steps, settings=dataclasses.replace(settings, seed=seed), log_every=0,
                          progress=progress)
        result = train(denoiser, loss_fn, get_batch, len(cache), cfg, accelerator=accelerator)
        if not result.finished:
            raise RuntimeError(f"{folder}: training stopped at step {result.step} of {steps}")
        state = lora_state_dict(dit)
        if accelerator is None or accelerator.is_main_process:
            save_lora(state, os.path.join(folder, LORA_FILE), {"stage": os.path.basename(folder), "image_side": image_side,
                                                                 "steps": steps, "rank": settings.rank})
        if accelerator is not None:
            accelerator.wait_for_everyone()
    finally:
        remove_lora(dit)
    return state


def _differential(dit, cache, settings, folder, seed, accelerator, progress) -> tuple[dict, dict]:
    """LoRA_1 on the originals, merged; LoRA_2 on the enhanced on top; LoRA_1 unmerged exactly."""
    from ..lora import load_lora, unload_lora

    lora1 = train_stage(dit, cache, "original", settings, os.path.join(folder, "stage1"), seed, settings.steps_stage1,
                        accelerator, progress)
    report = load_lora(dit, lora1)  # our exact merge: fp32 accumulation, one rounding, a host backup
    try:
        lora2 = train_stage(dit, cache, "enhanced", settings, os.path.join(folder, "stage2"), seed + 1,
                            settings.steps_stage2, accelerator, progress)
    finally:
        unload_lora(dit, report.handle)  # bit-exact restore of the base
    return lora2, {stage: _losses(os.path.join(folder, stage)) for stage in ("stage1", "stage2")}


def train_round_lora(dit: torch.nn.Module, cache: LatentCache, settings: LoRATrainSettings, folder: str,
                     accelerator=None, progress: bool = True) -> RoundLoRA:
    """The round's LoRA in `settings.mode`, written to `{folder}/lora.safetensors`."""
    from ..lora import combine_loras

    settings.validate()
    if len(cache) == 0:
        raise UsageError("no kept pairs to train on")
    out = os.path.join(folder, LORA_FILE)
    info: dict = {"mode": settings.mode, "pairs": len(cache), "settings": asdict(settings)}
    main = accelerator is None or accelerator.is_main_process
    if settings.mode == "sft":
        state = train_stage(dit, cache, "enhanced", settings, os.path.join(folder, "stage2"), settings.seed,
                            settings.steps_stage2, accelerator, progress)
        info["losses"] = {"stage2": _losses(os.path.join(folder, "stage2"))}
    elif settings.mode == "batched":
        state, info["losses"] = _differential(dit, cache, settings, folder, settings.seed, accelerator, progress)
    else:
        per_pair, losses = [], {}
        for i, pair_id in enumerate(cache.ids):
            sub = os.path.join(folder, f"pair-{pair_id}")
            lora2, pair_losses = _differential(dit, cache.subset([i]), settings, sub, settings.seed + 1000 * (i + 1),
                                               accelerator, progress)
            per_pair.append(lora2)
            losses[pair_id] = pair_losses
        target = settings.per_pair_rank or settings.rank
        layers, combined = combine_loras(per_pair, average=True, rank=target)
        state = layers_to_training_state(layers)
        info["losses"] = losses
        info["energy_min"] = combined.get("min_energy", 1.0)
        info["ranks_before"] = max(combined["ranks_before"].values())
        logger.info("per-pair: %d LoRA_2s averaged; truncated to rank %d, retained energy >= %.4f", len(per_pair),
                    target, info["energy_min"])
    if main:
        save_lora(state, out, {"mode": settings.mode, "pairs": len(cache), "rank": settings.rank})
        atomic_write_json(os.path.join(folder, "train.json"), info)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return RoundLoRA(state=state, path=out, info=info)


def layers_to_training_state(layers: dict) -> dict[str, torch.Tensor]:
    """combine_loras' layers ("dit:module" -> LoRALayer, scales folded) in the training format."""
    out = {}
    for key, layer in layers.items():
        component, module = key.split(":", 1)
        if component != "dit":
            raise UsageError(f"{key}: the training format holds DiT layers only")
        out[f"{module}.lora_A.default.weight"] = layer.A.float().contiguous()
        out[f"{module}.lora_B.default.weight"] = layer.B.float().contiguous()
    return out
