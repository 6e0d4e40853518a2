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
- `sft`: the ablation, one LoRA trained on the enhanced images only;
- `dpo`: one LoRA trained on both images of each pair under the SAME noise and timestep, by
  Flow-DPO (enhanced preferred, original rejected, the running base as reference): what a
  pair's images share cancels exactly instead of being absorbed by a LoRA_1.

Every stage also measures its paired gap (`gap.json`): the mean flow-matching error of the
enhanced images minus the originals' under the same fixed noise and timesteps, before the stage
(adapters off) and after it. A stage that learned the difference lowers it; one that learned
what both images share lowers both errors and leaves the gap.

With `ema_decay` set, a stage's LoRA (and its paired gap after training) is the exponential
moving average of its weights over the steps, not the last step's weights.

Every stage writes into its own folder (stage.json first: everything the stage's LoRA
depends on; then checkpoints, loss.jsonl, and lora.safetensors last), so a run killed anywhere
resumes at the stage and step where it stopped, and a folder trained with anything else
(settings, steps, images, base) is refused before any training, never reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import asdict, dataclass

import torch

from ..errors import UsageError
from ..files import atomic_write_json, check_safetensors, first_difference, read_json, sha256_file
from ..quant import quantized_method
from .cache import LatentCache
from .flow import FlowDPOObjective, FlowMatchObjective, FluxDenoiser, paired_errors
from .loop import SampleRandom, TrainConfig, train
from .lora import adapters_disabled, inject_lora, lora_state_dict, remove_lora, save_lora
from .loss_log import read_loss_log
from .settings import MODES, LoRATrainSettings  # noqa: F401  (MODES: part of this module's API)

logger = logging.getLogger(__name__)

LORA_FILE = "lora.safetensors"
GAP_FILE = "gap.json"  # a stage's paired gap before and after it trained
# The paired gap's fixed draws: the same noise and timesteps for every stage, round and model
# state, so gaps are comparable; the first GAP_PAIRS pairs, GAP_DRAWS draws each.
GAP_SEED, GAP_PAIRS, GAP_DRAWS = 2412_12888, 64, 2
PAIRS_SIDE = "pairs"  # the image side of a DPO stage: both images of each pair
BUCKET_BATCHES = "one bucket each"  # a stage identity's "batches" where pairs come in several sizes


@dataclass
class RoundLoRA:
    """A round's trained LoRA (training format, alpha folded) and what training measured."""

    state: dict[str, torch.Tensor]
    path: str
    info: dict


def _losses(folder: str) -> list[float]:
    """The per-step losses of a stage, from its loss log."""
    return [r["loss"] for r in read_loss_log(folder)]


STAGE_RECORD = "stage.json"  # written before a stage trains: everything its LoRA depends on
STAGE_FORMAT = 1
LORA_1 = "lora_1"  # stage 2's identity key for the LoRA_1 merged under it


def _stage_done(folder: str) -> bool:
    path = os.path.join(folder, LORA_FILE)
    if not os.path.isfile(path):
        return False
    check_safetensors(path, "delete the stage folder; the next run trains the stage again")
    return True


def stage_config(cache: LatentCache, image_side: str, settings: LoRATrainSettings, folder: str, seed: int, steps: int,
                 base_loras=(), lora_1: str | None = None, latents_sha256: dict | None = None,
                 progress: bool = True, processes: int = 1, base_quantize: str | None = None) -> TrainConfig:
    """The loop's config of one stage. Its identity (the stage record and every checkpoint)
    holds everything the stage's LoRA depends on: every training setting, the step count, the
    images (side, pair ids in order, each pair's cached tensors' sha256), the base it trains
    on top of (the sha256s of the LoRAs merged into the DiT; `lora_1`: stage 2's LoRA_1) and
    the number of processes (the global batch and each sample's position depend on it), the
    quantisation of the base when it is quantised (`base_quantize`, absent otherwise: the
    identities of stages on an unquantised base are what they were), and, for pairs in several
    buckets, that batches are drawn one bucket each (absent for one bucket: as before buckets)."""
    latents = latents_sha256 if latents_sha256 is not None else cache.pair_sha256s()
    depends_on = {"image_side": image_side, "pairs": list(cache.ids),
                  "pairs_sha256": {pair_id: latents[pair_id] for pair_id in cache.ids},
                  "base_loras": list(base_loras), LORA_1: lora_1, "processes": processes}
    if base_quantize:
        depends_on["base_quantize"] = base_quantize
    if len(set(cache.buckets())) > 1:
        depends_on["batches"] = BUCKET_BATCHES
    return TrainConfig(output_dir=folder, steps=steps, settings=dataclasses.replace(settings, seed=seed), log_every=0,
                       progress=progress, depends_on=depends_on)


def _stage_record(cfg: TrainConfig) -> dict:
    return {"format": STAGE_FORMAT, **cfg.identity()}


def _refusal(folder: str, diff: str) -> UsageError:
    return UsageError(f"{folder} holds a stage trained with other settings ({diff}); delete the folder to train it "
                      "again with these (nothing was changed)")


def _check_stage_folder(folder: str, record: dict, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a stage folder whose record differs from `record` (keys in `ignore` aside), or
    that holds files but no record (made before stage records: what it was trained with is
    unknown). Nothing is written or removed."""
    path = os.path.join(folder, STAGE_RECORD)
    if not os.path.exists(path):
        # another rank may be writing the record right now: its temporary file is no content
        content = [n for n in os.listdir(folder) if not n.startswith(STAGE_RECORD)] if os.path.isdir(folder) else []
        if content:
            raise UsageError(f"{folder} holds a stage without a {STAGE_RECORD} (from an older artaug-ext), so what it "
                             "was trained with is unknown; delete the folder to train it again (nothing was changed)")
        return
    recorded = read_json(path, "stage record", f"delete {folder} to train the stage again")
    mine = {k: v for k, v in record.items() if k not in ignore}
    diff = first_difference({k: v for k, v in recorded.items() if k not in ignore}, mine)
    if diff:
        raise _refusal(folder, diff)


def _sample_hook(sampler, every: int, steps: int, folder: str):
    """The loop's on_step hook that calls `sampler(folder, step)` every `every` steps and at the
    stage's last step (None: no sampler, or `every` 0). The loop runs it on the main process
    only; under DDP the other ranks wait for it at the next collective (the step's agreement or
    checkpoint barrier), so a sample must take less than the launch's collective timeout."""
    if sampler is None or every <= 0:
        return None

    def on_step(step: int, loss: float) -> None:
        if step % every == 0 or step == steps:
            sampler(folder, step)

    return on_step


def train_stage(dit: torch.nn.Module, cache: LatentCache, image_side: str, settings: LoRATrainSettings, folder: str,
                seed: int, steps: int, accelerator=None, progress: bool = True, *, base_loras=(),
                lora_1: str | None = None, latents_sha256: dict | None = None,
                sampler=None) -> dict[str, torch.Tensor]:
    """Train one LoRA on the `image_side` images of `cache` on top of the DiT as it is; returns it
    (training format). `base_loras`: the sha256s of the LoRAs merged into the DiT, in order
    (`lora_1`: LoRA_1's, under stage 2). The stage's record is written before it trains; a
    stage folder recorded with anything else is refused, never reused, and one whose
    lora.safetensors exists with the same record is not trained again. The adapters are
    removed again before returning, so the DiT's module tree is unchanged. `sampler(folder,
    step)`: called every `settings.sample_every` steps and at the last step, on the main process,
    with the adapters in training injected (`samples.StageSampler`: the stage's sample images)."""
    from safetensors.torch import load_file

    cfg = stage_config(cache, image_side, settings, folder, seed, steps, base_loras, lora_1, latents_sha256, progress,
                       processes=_processes(accelerator), base_quantize=quantized_method(dit))
    record = _stage_record(cfg)
    _check_stage_folder(folder, record)
    if not os.path.exists(os.path.join(folder, STAGE_RECORD)):
        atomic_write_json(os.path.join(folder, STAGE_RECORD), record, shared=True)  # every rank may write it
    if _stage_done(folder):
        return load_file(os.path.join(folder, LORA_FILE))
    inject_lora(dit, settings.rank, settings.alpha, settings.target_modules, init_seed=seed)
    try:
        denoiser = FluxDenoiser(dit, use_gradient_checkpointing=settings.gradient_checkpointing)
        objective = FlowMatchObjective(weighting=settings.weighting, guidance=settings.guidance,
                                       sampling=settings.timestep_sampling)
        dtype = next(dit.parameters()).dtype
        if image_side == PAIRS_SIDE:
            dpo = FlowDPOObjective(objective, settings.dpo_beta, lambda: adapters_disabled(dit), settings.dpo_sft_weight)

            def loss_fn(model, batch, rng):
                return dpo(model, batch, rng)

            def get_batch(indices):
                return {k: v.to(dtype) for k, v in cache.pairs_batch(indices).items()}
        else:
            def loss_fn(model, batch, rng):
                return objective(model, batch["latents"], batch["prompt_emb"], batch["pooled_prompt_emb"], rng)

            def get_batch(indices):
                return {k: v.to(dtype) for k, v in cache.batch(image_side, indices).items()}

        buckets = cache.buckets()
        by_bucket = {"buckets": buckets} if len(set(buckets)) > 1 else {}  # one bucket: one permutation, as before
        result = train(denoiser, loss_fn, get_batch, len(cache), cfg, accelerator=accelerator,
                       on_step=_sample_hook(sampler, settings.sample_every, steps, folder), **by_bucket)
        if not result.finished:
            raise RuntimeError(f"{folder}: training stopped at step {result.step} of {steps}")
        with result.ema.applied() if result.ema is not None else contextlib.nullcontext():
            # ema_decay: the stage's LoRA is the average, exported and measured as such
            state = lora_state_dict(dit)
            gap = paired_gap(denoiser, cache, objective, settings.batch_size, dtype)
        if accelerator is None or accelerator.is_main_process:
            atomic_write_json(os.path.join(folder, GAP_FILE), gap)
            save_lora(state, os.path.join(folder, LORA_FILE), {"stage": os.path.basename(folder), "image_side": image_side,
                                                                 "steps": steps, "rank": settings.rank})
        if accelerator is not None:
            accelerator.wait_for_everyone()
    finally:
        remove_lora(dit)
    return state


def _errors_on(denoiser, cache: LatentCache, objective: FlowMatchObjective, batch_size: int, dtype) -> dict:
    """Mean error of the originals and of the enhanced images under the fixed paired draws
    (in batches of one bucket each)."""
    n = min(len(cache), GAP_PAIRS)
    sums = {"original": 0.0, "enhanced": 0.0}
    jobs = [(i, d) for d in range(GAP_DRAWS) for i in range(n)]
    buckets = cache.buckets()
    groups: dict = {}
    for job in jobs:
        groups.setdefault(buckets[job[0]], []).append(job)
    chunks = [group[start:start + batch_size] for _, group in sorted(groups.items())
              for start in range(0, len(group), batch_size)]
    for chunk in chunks:
        batch = {k: v.to(dtype) for k, v in cache.pairs_batch([i for i, _ in chunk]).items()}
        rng = SampleRandom(GAP_SEED, [d * GAP_PAIRS + i for i, d in chunk])
        e_orig, e_enh = paired_errors(objective, denoiser, batch, objective.draw(rng, batch["original"]))
        sums["original"] += float(e_orig.sum())
        sums["enhanced"] += float(e_enh.sum())
    out = {k: v / len(jobs) for k, v in sums.items()}
    out["gap"] = out["enhanced"] - out["original"]
    return out


def paired_gap(denoiser, cache: LatentCache, objective: FlowMatchObjective, batch_size: int, dtype) -> dict:
    """The stage's paired gap: each side's error and their difference (enhanced minus original)
    under the same fixed noise and timesteps, with the stage's LoRA off (before) and on
    (after), and `learned`: after minus before (negative: the LoRA made the enhanced images
    easier relative to the originals, i.e. it learned the pairs' difference)."""
    was_training = denoiser.training
    denoiser.eval()
    try:
        with torch.no_grad():
            with adapters_disabled(denoiser.dit):
                before = _errors_on(denoiser, cache, objective, batch_size, dtype)
            after = _errors_on(denoiser, cache, objective, batch_size, dtype)
    finally:
        denoiser.train(was_training)
    return {"pairs": min(len(cache), GAP_PAIRS), "draws": GAP_DRAWS, "seed": GAP_SEED, "before": before,
            "after": after, "learned": after["gap"] - before["gap"]}


def stage_gap(folder: str) -> dict | None:
    """A finished stage's paired gap (None: the stage was trained before gaps were measured)."""
    path = os.path.join(folder, GAP_FILE)
    return read_json(path, "paired gap", f"delete {folder} to train the stage again") if os.path.isfile(path) else None


@dataclass
class _Stage:
    """One stage a round will train: its folder, images, seed and steps, and its pairs."""

    folder: str
    image_side: str
    seed: int
    steps: int
    cache: LatentCache
    lora_1_of: str | None = None  # stage 2 of a differential mode: the stage 1 folder whose LoRA_1 is under it


def _differential_stages(cache: LatentCache, settings: LoRATrainSettings, folder: str, seed: int) -> list[_Stage]:
    stage1 = os.path.join(folder, "stage1")
    return [_Stage(stage1, "original", seed, settings.steps_stage1, cache),
            _Stage(os.path.join(folder, "stage2"), "enhanced", seed + 1, settings.steps_stage2, cache, stage1)]


def _round_stages(cache: LatentCache, settings: LoRATrainSettings, folder: str) -> list[list[_Stage]]:
    """The round's stages, grouped as they train together (one group per pair in per-pair mode)."""
    if settings.mode == "sft":
        return [[_Stage(os.path.join(folder, "stage2"), "enhanced", settings.seed, settings.steps_stage2, cache)]]
    if settings.mode == "dpo":
        return [[_Stage(os.path.join(folder, "dpo"), PAIRS_SIDE, settings.seed, settings.steps_stage2, cache)]]
    if settings.mode == "batched":
        return [_differential_stages(cache, settings, folder, settings.seed)]
    return [_differential_stages(cache.subset([i]), settings, os.path.join(folder, f"pair-{pair_id}"),
                                 settings.seed + 1000 * (i + 1)) for i, pair_id in enumerate(cache.ids)]


def _processes(accelerator) -> int:
    return 1 if accelerator is None else accelerator.num_processes


def _check_round_folders(stages: list[_Stage], settings: LoRATrainSettings, base_loras, latents: dict,
                         processes: int = 1, base_quantize: str | None = None) -> None:
    """Every stage folder of the round against what it would be trained with, before any
    training: a stale folder is refused here, naming the setting and the folder. Stage 2's
    LoRA_1 is known only once stage 1 is done; a stage 2 that holds anything while its stage 1
    has no LoRA was trained on a LoRA_1 that is gone."""
    for st in stages:
        cfg = stage_config(st.cache, st.image_side, settings, st.folder, st.seed, st.steps, base_loras, None, latents,
                           progress=False, processes=processes, base_quantize=base_quantize)
        _check_stage_folder(st.folder, _stage_record(cfg), ignore=(LORA_1,) if st.lora_1_of else ())
        if st.lora_1_of and os.path.isdir(st.folder) and os.listdir(st.folder) and not _stage_done(st.lora_1_of):
            raise UsageError(f"{st.folder} was trained on a LoRA_1 that {st.lora_1_of} no longer holds; delete "
                             f"{st.folder} to train it again (nothing was changed)")


def _train_stages(dit, stages: list[_Stage], settings, base_loras, latents, accelerator, progress,
                  sampler=None) -> tuple[dict, dict]:
    """Train a group of stages: one alone (sft), or LoRA_1 on the originals, merged, LoRA_2 on
    the enhanced on top, LoRA_1 unmerged exactly. Returns the last stage's LoRA and the losses."""
    from ..lora import load_lora, unload_lora

    losses = {}
    if len(stages) == 1:
        st = stages[0]
        state = train_stage(dit, st.cache, st.image_side, settings, st.folder, st.seed, st.steps, accelerator, progress,
                            base_loras=base_loras, latents_sha256=latents, sampler=sampler)
        return state, {os.path.basename(st.folder): _losses(st.folder)}
    first, second = stages
    lora1 = train_stage(dit, first.cache, first.image_side, settings, first.folder, first.seed, first.steps,
                        accelerator, progress, base_loras=base_loras, latents_sha256=latents, sampler=sampler)
    lora1_sha = sha256_file(os.path.join(first.folder, LORA_FILE))
    # our exact merge (fp32 accumulation, one rounding, a host backup); on a quantised base,
    # LoRA_1 is hot-loaded instead: frozen and active under LoRA_2, applied at every forward
    report = load_lora(dit, lora1)
    try:
        lora2 = train_stage(dit, second.cache, second.image_side, settings, second.folder, second.seed, second.steps,
                            accelerator, progress, base_loras=base_loras, lora_1=lora1_sha, latents_sha256=latents,
                            sampler=sampler)
    finally:
        unload_lora(dit, report.handle)  # bit-exact restore of the base
    for st in stages:
        losses[os.path.basename(st.folder)] = _losses(st.folder)
    return lora2, losses


def train_round_lora(dit: torch.nn.Module, cache: LatentCache, settings: LoRATrainSettings, folder: str,
                     accelerator=None, progress: bool = True, base_loras=(), sampler=None) -> RoundLoRA:
    """The round's LoRA in `settings.mode`, written to `{folder}/lora.safetensors`.
    `base_loras`: the sha256s of the LoRAs merged into `dit` (the running base's round LoRAs),
    part of every stage's identity. Every stage folder already there is checked first.
    `sampler`: every stage's sample images (`train_stage`; None: none)."""
    from ..lora import combine_loras

    settings.validate()
    if len(cache) == 0:
        raise UsageError("no kept pairs to train on")
    base_loras = list(base_loras)
    latents = cache.pair_sha256s()
    groups = _round_stages(cache, settings, folder)
    _check_round_folders([st for group in groups for st in group], settings, base_loras, latents,
                         _processes(accelerator), quantized_method(dit))
    out = os.path.join(folder, LORA_FILE)
    info: dict = {"mode": settings.mode, "pairs": len(cache), "settings": asdict(settings), "base_loras": base_loras}
    main = accelerator is None or accelerator.is_main_process
    if settings.mode != "per-pair":
        state, info["losses"] = _train_stages(dit, groups[0], settings, base_loras, latents, accelerator, progress,
                                              sampler)
        info["gaps"] = {os.path.basename(st.folder): stage_gap(st.folder) for st in groups[0]}
    else:
        per_pair, losses = [], {}
        for pair_id, group in zip(cache.ids, groups, strict=True):
            lora2, losses[pair_id] = _train_stages(dit, group, settings, base_loras, latents, accelerator, progress,
                                                   sampler)
            per_pair.append(lora2)
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
