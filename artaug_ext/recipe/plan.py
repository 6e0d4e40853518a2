"""`artaug run --dry-run`: what a recipe would do, what it needs, and about how long it takes.

Nothing is loaded or downloaded: model files are looked up on this machine only, a critic
server is not contacted, and the time estimate multiplies per-unit figures that it prints
with their source (the model card's, or the recipe's [estimate] table).
"""

from __future__ import annotations

import os

from ..train.settings import SINGLE_STAGE_MODES
from .config import Recipe

# The ArtAug authors report keeping about 1-2% of generated pairs; the estimate assumes the top
# of that range unless the recipe caps the pairs per round.
ASSUMED_KEEP_RATE = 0.02
# A DPO sample is a pair: both images forward and backward (2 samples' work) and the reference's
# forward without gradients (about a third of a sample's forward + backward each: 2/3).
DPO_SAMPLE_COST = 2 + 2 / 3


def _presence(recipe: Recipe, model_dir: str | None) -> list[str]:
    from ..cards import card
    from ..hub import find_files, model_root

    lines = []
    c = card(recipe.run.model)
    root = model_root(model_dir)
    if c.is_tiny:
        lines.append(f"  base model   {c.name}: embedded in artaug-ext (written to {root} on first use)")
    else:
        found = find_files(c.modelscope_id, list(c.files.values()), model_dir)
        state = "present" if found else f"MISSING (run `artaug download {c.name}` or pass --model-dir)"
        lines.append(f"  base model   {c.name} = {c.modelscope_id}: {state} under {root}")
    crit = recipe.critic
    if crit.backend == "openai":
        lines.append(f"  critic       {crit.model or '?'} at {crit.base_url or '$ARTAUG_CRITIC_BASE_URL'} "
                     "(an OpenAI-compatible server; not contacted by a dry run)")
    elif crit.backend == "transformers":
        where = "present" if crit.model and os.path.isdir(crit.model) else "a hub id or a missing folder"
        lines.append(f"  critic       {crit.model} (transformers, {where})")
    else:
        lines.append("  critic       heuristic (no model)")
    metrics = [m for m in recipe.filter.scorer.split("+") if m.strip() and m.strip() != "heuristic"]
    if metrics:
        from ..tiny.metrics import METRIC_FOLDERS

        mc = card("image-metrics")
        for m in metrics:
            folder = METRIC_FOLDERS.get(m.strip())
            found = folder and find_files(mc.modelscope_id, [folder + "/"], model_dir)
            lines.append(f"  scorer       {m.strip()}: {mc.modelscope_id}/{folder}/ "
                         f"{'present' if found else 'MISSING (artaug download image-metrics --files ' + str(folder) + '/)'}")
    else:
        lines.append("  scorer       heuristic (no model)")
    return lines


def pairs_estimate(recipe: Recipe, items: int) -> int:
    """Trained pairs a round: filter.max_pairs, else the authors' keep rate of the items (keep
    "score"), or every item (keep "enhanced": an upper bound, each item the critic improves)."""
    rate = ASSUMED_KEEP_RATE if recipe.filter.keep == "score" else 1.0
    return recipe.filter.max_pairs or max(1, round(items * rate * recipe.filter.keep_fraction))


def _pairs_source(recipe: Recipe) -> str:
    if recipe.filter.max_pairs:
        return "filter.max_pairs"
    if recipe.filter.keep == "enhanced":
        return "filter.keep \"enhanced\": every item, at most"
    return f"{ASSUMED_KEEP_RATE:.0%} of the items, the authors report 1-2%"


def recipe_buckets(recipe: Recipe) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
    """(the generation buckets, the training buckets) of a recipe whose prompts carry sizes,
    each sorted by pixel count, largest last (None: no prompt carries a size). Prompts without a
    size are made at the run's size, which is then a bucket too."""
    from ..buckets import bucket_size, training_bucket

    sizes = recipe.prompt_sizes()
    if sizes is None:
        return None
    width, height = recipe.generation_size()
    made = {bucket_size(*s, width * height) if s else (width, height) for s in sizes}
    trained = {training_bucket(w, h, recipe.train.resolution) for w, h in made}

    def by_area(found):
        return sorted(found, key=lambda wh: (wh[0] * wh[1], wh))

    return by_area(made), by_area(trained)


def _sizes_text(sizes: list[tuple[int, int]]) -> str:
    return ", ".join(f"{w}x{h}" for w, h in sizes)


def _training_line(t) -> str:
    """The [train] settings as the plan states them: the stages the mode trains."""
    if t.mode == "dpo":
        anchor = f", sft weight {t.dpo_sft_weight:g}" if t.dpo_sft_weight else ""
        stages = f"one Flow-DPO stage of {t.steps_stage2} steps (beta {t.dpo_beta:g}{anchor})"
    elif t.mode == "sft":
        stages = f"one stage of {t.steps_stage2} steps"
    else:
        stages = f"{t.steps_stage1} + {t.steps_stage2} steps"
    return (f"  training: mode {t.mode}, rank {t.rank}, lr {t.lr:g}, {stages} at batch {t.batch_size} x "
            f"{t.grad_accum}, resolution {t.resolution or 'as generated'}")


def _memory_lines(recipe: Recipe, c, size, pairs: int, gpus: int) -> list[str]:
    """Per-process host and GPU memory of the recipe's last round, from the card's shape table,
    and which card sizes it fits."""
    from .memory import GB, GPU_DTYPE_BYTES, UnknownStorage, fits, memory_plan

    if c.shapes is None:
        return ["memory: no per-layer shape table for this model (cards.py, `shapes`)"]
    t, r = recipe.train, recipe.run
    side = size if isinstance(size, int) else max(size)
    buckets = recipe_buckets(recipe)
    pixels = {}
    if buckets is not None:  # activations and the cache at the largest bucket
        made, trained = buckets
        pixels = {"generate_pixels": made[-1][0] * made[-1][1], "train_pixels": trained[-1][0] * trained[-1][1]}
    try:
        m = memory_plan(c.shapes, targets=t.target_modules, rank=t.rank, dtype_bytes=GPU_DTYPE_BYTES, device="cuda",
                        train_px=t.resolution or side, generate_px=side, **pixels,
                        text_tokens=c.defaults.t5_sequence_length,
                        batch_size=t.batch_size * (2 if t.mode == "dpo" else 1),
                        gradient_checkpointing=t.gradient_checkpointing, pairs=pairs, world=gpus,
                        quantize=r.quantize, text_encoders=r.text_encoders, optimizer=t.optimizer,
                        ema=t.ema_decay is not None, hot_loaded_round_loras=r.rounds - 1)
    except UnknownStorage:
        return [f"memory: no storage figure for the quantisation method {r.quantize!r} (recipe/memory.py, "
                "QUANT_STORAGE)"]
    p = m.parts
    base = (f"DiT quantised {r.quantize}, text encoders {r.text_encoders}" if r.quantize
            else f"bf16, text encoders {r.text_encoders}")
    if r.quantize:
        lora_1 = (f"LoRA_1 and {r.rounds - 1} round LoRA(s) hot-loaded on the GPU: "
                  f"{p['hot-loaded LoRAs (device)'] / GB:.2f} GB, no merge backup")
    else:
        lora_1 = (f"LoRA_1's merge backup: {p['LoRA_1 merge backup'] / GB:.1f} GB pinned for the "
                  f"{p['touched weights'] / GB:.1f} GB of weights it touches, as torch's pinned allocator rounds "
                  "each tensor up to a power of two")
    at = ""
    if buckets is not None:
        at = (f"; at the largest buckets: {made[-1][0]}x{made[-1][1]} generated, "
              f"{trained[-1][0]}x{trained[-1][1]} trained")
    lines = [f"memory (counted from {c.name}'s per-layer shapes on CUDA, {base}{at}; beyond the runtime):",
             f"  host memory per process: {m.host_generation / GB:.1f} GB generation, {m.host_training / GB:.1f} GB "
             f"training ({lora_1}; the latent cache {p['latent cache (host)'] / GB:.2f} GB"
             + (f"; the offloaded text encoders {p['offloaded text encoders (host)'] / GB:.1f} GB" if
                p["offloaded text encoders (host)"] else "") + f"); x {gpus} process(es) a node"]
    if m.host_load:
        lines.append(f"  host memory while loading: {m.host_load / GB:.1f} GB (DiffSynth reads the DiT in bf16 on the "
                     "host and quantises it a layer at a time onto the GPU)")
    lines.append(f"  GPU memory per process: {m.gpu_generation / GB:.1f} GB generation, {m.gpu_training / GB:.1f} GB "
                 f"training (weights {p['weights'] / GB:.1f} GB, LoRA training state "
                 f"{p['LoRA_2 training state'] / GB:.2f} GB ({t.optimizer}"
                 f"{', EMA' if t.ema_decay is not None else ''}), activations "
                 f"{p['training activations'] / GB:.1f} GB)")
    lines.append(f"  cards: {fits(max(m.gpu_generation, m.gpu_training))}")
    return lines


def _bucket_lines(recipe: Recipe) -> list[str]:
    buckets = recipe_buckets(recipe)
    if buckets is None:
        return []
    made, trained = buckets
    width, height = recipe.generation_size()
    return [f"  buckets (prompts with a size, at most {width}x{height} = {width * height} pixels): {len(made)} "
            f"generated ({_sizes_text(made)}), {len(trained)} trained ({_sizes_text(trained)}); a training batch "
            "holds one bucket"]


def describe(recipe: Recipe, model_dir: str | None = None, gpus: int = 1) -> str:
    """The plan as text (what --dry-run prints)."""
    from ..cards import card

    c = card(recipe.run.model)
    d, t, r = recipe.data, recipe.train, recipe.run
    prompts = recipe.prompts()
    size = d.size or c.defaults.size
    steps = d.steps or c.defaults.steps
    items = len(prompts) * d.images_per_prompt
    lines = [f"recipe {recipe.path}", "needs:"] + _presence(recipe, model_dir)
    lines += ["data:",
              f"  {len(prompts)} prompts x {d.images_per_prompt} images = {items} items a round, up to {r.rounds} rounds",
              f"  images {size if isinstance(size, int) else 'x'.join(map(str, size))} px, {steps} steps; each item: "
              f"an original, a critique (<= {recipe.critic.max_suggestions} regions) and an enhanced image",
              _training_line(t),
              *_bucket_lines(recipe),
              f"  final: the sum of the round LoRAs{f', truncated to rank {r.final_rank}' if r.final_rank else ''}"]
    lines += _memory_lines(recipe, c, size, pairs_estimate(recipe, items), gpus)
    est = recipe.estimate
    timing = c.timing
    image_s = est.image_seconds if est.image_seconds is not None else (timing.image_seconds if timing else None)
    step_s = est.train_step_seconds if est.train_step_seconds is not None else (timing.train_step_seconds if timing else None)
    if image_s is None or step_s is None:
        lines.append("estimate: no per-unit figures for this model; give them in the recipe's [estimate] table")
        return "\n".join(lines)
    source = est.source or (timing.source if timing else "")
    # Scale the card's figures (default size and steps) to the recipe's: DiT work grows with the
    # number of image tokens (the area; attention grows faster, so this is a lower bound).
    side = size if isinstance(size, int) else int((size[0] * size[1]) ** 0.5)
    if est.image_seconds is None:
        image_s *= (side / c.defaults.size) ** 2 * steps / c.defaults.steps
    if est.train_step_seconds is None:
        step_s *= ((t.resolution or side) / c.defaults.size) ** 2
    device = timing.device if timing else "the recipe's device"
    # An enhanced image runs the DiT on the global prompt and every region prompt at each step.
    item_s = image_s * (2 + recipe.critic.max_suggestions) + (est.critic_seconds if recipe.critic.backend != "heuristic" else 0.0)
    pairs = pairs_estimate(recipe, items)
    stage_steps = (0 if t.mode in SINGLE_STAGE_MODES else t.steps_stage1) + t.steps_stage2
    # Generation is sharded by rank; training is DDP: every rank runs a full batch a step (the
    # global batch grows with the GPUs, the wall time does not shrink), and per-pair mode trains
    # its pairs one after the other, each on every rank.
    train_steps = stage_steps * (pairs if t.mode == "per-pair" else 1) * t.grad_accum * t.batch_size
    if t.mode == "dpo":  # each sample is a pair: both images forward and backward, and the reference forward
        train_steps *= DPO_SAMPLE_COST
    # Sample images (train.sample_every): each stage draws its sample prompts every N steps and at its last
    stages = (1 if t.mode in SINGLE_STAGE_MODES else 2) * (pairs if t.mode == "per-pair" else 1)
    samples_s = 0.0
    if t.sample_every:
        from ..train.settings import SAMPLE_PROMPTS

        per_stage = -(-max(t.steps_stage1, t.steps_stage2) // t.sample_every) + 1  # at most: every N steps and the last
        samples_s = stages * per_stage * len(t.sample_prompts or prompts[:SAMPLE_PROMPTS]) * image_s
    round_s = items * item_s / gpus + train_steps * step_s + samples_s
    total_s = round_s * r.rounds
    lines += ["estimate (assumptions, not measurements of this run):",
              f"  per unit on {device}: {image_s:.3g} s an image, {step_s:.3g} s a training sample at "
              f"{t.resolution or side} px (the card's figures scaled by image area)"
              + (f", {est.critic_seconds:g} s a critique" if recipe.critic.backend != "heuristic" else ""),
              f"  source: {source}",
              f"  per item: {item_s:.1f} s (original + enhanced at {1 + recipe.critic.max_suggestions} prompts a step)",
              f"  trained pairs a round: {pairs} ({_pairs_source(recipe)})",
              f"  per round: {items * item_s / gpus / 3600:.2f} h generation + {train_steps * step_s / 3600:.2f} h "
              f"training on {gpus} GPU(s)" + (f" + {samples_s / 3600:.2f} h of sample images" if samples_s else ""),
              f"  training is DDP: each of the {gpus} process(es) runs batch {t.batch_size} x {t.grad_accum} a step, a "
              f"global batch of {gpus * t.batch_size * t.grad_accum}",
              f"  total for {r.rounds} rounds: about {total_s / 3600:.2f} h wall on {gpus} GPU(s) = "
              f"{total_s * gpus / 3600:.1f} GPU-hours"]
    return "\n".join(lines)
