"""`artaug run RECIPE.toml`: the whole ArtAug loop, round after round, into a run folder."""

from __future__ import annotations

import logging
import os

from .args import add_launch_options, check_device, check_model_dir, check_output_dir, positive_int

logger = logging.getLogger("artaug_ext.cli")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run an ArtAug recipe: rounds of interaction and differential LoRA training")
    p.add_argument("recipe", help="recipe file (TOML), e.g. recipes/smoke.toml")
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe name>); run again to resume")
    p.add_argument("--dry-run", action="store_true", help="print the plan, what it needs and a time estimate; run nothing")
    p.add_argument("--gpus", type=positive_int, default=None, help="--dry-run: GPUs to estimate for (default: WORLD_SIZE or 1)")
    p.add_argument("--model-dir", default=None, help="model root (default: ARTAUG_HOME, DIFFSYNTH_MODEL_BASE_PATH, ~/.cache/artaug)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available; LOCAL_RANK under torchrun)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    add_launch_options(p)
    p.set_defaults(run=run)


def default_out(recipe) -> str:
    name = recipe.run.name or os.path.splitext(os.path.basename(recipe.path))[0]
    return os.path.join("runs", name)


def run(args) -> int:
    from ..recipe.config import load_recipe
    from ..recipe.layout import RUN_LOCK

    recipe = load_recipe(args.recipe)
    if args.dry_run:
        from ..dist import process_info
        from ..recipe.plan import describe

        gpus = args.gpus or process_info().world
        print(describe(recipe, model_dir=args.model_dir, gpus=gpus))
        return 0
    out = args.out or default_out(recipe)
    check_output_dir("--out", out)
    launch = args.launch
    launch.open_folder(out, RUN_LOCK)  # before torch: a folder in use is refused at once, on every rank
    check_device("--device", args.device)
    check_model_dir(recipe.run.model, args.model_dir)
    from ..recipe.runner import run_recipe
    from .interact import set_threads

    set_threads(args.threads, args.device)
    summary = run_recipe(recipe, out, model_dir=args.model_dir, device=args.device,
                         progress=not args.no_progress and launch.info.main, launch=launch)
    if launch.info.main:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    lines = [f"run folder {summary['out']}"]
    from ..recipe.layout import RoundRecord

    for rec in map(RoundRecord.from_dict, summary["rounds"]):
        line = (f"  round {rec.round}: {rec.items} items, {rec.enhanced} enhanced, {rec.kept} kept "
                f"({rec.kept_fraction:.0%}), mean gain of kept {rec.mean_gain:.4f}; {rec.usable_suggestions} of "
                f"{rec.suggestions} suggestions had a usable local prompt")
        name, stage = next(((k, v) for k, v in (rec.train or {}).items() if k in ("stage2", "dpo") and v), (None, {}))
        if stage:
            line += (f"; trained on {rec.trained_pairs} pairs, {'stage-2' if name == 'stage2' else 'DPO'} loss "
                     f"{stage['first']:.4f} -> {stage['last']:.4f} (mean of the first and last "
                     f"{stage.get('window', 1)} steps)")
            gap = stage.get("paired_gap")
            if gap:
                line += (f"; paired gap (enhanced minus original error) {gap['before']:+.5f} -> {gap['after']:+.5f}"
                         f" ({'learned the difference' if gap['learned'] < 0 else 'did not learn the difference'})")
        lines.append(line)
    if summary.get("stopped"):
        lines.append(f"  stopped: {summary['stopped']}")
    final = summary.get("final")
    if final:
        energy = f", retained energy >= {final['energy_min']:.4f}" if final.get("rank") else " (exact sum)"
        lines.append(f"  final LoRA: {os.path.join(summary['out'], final['lora'])} ({final['rounds']} round(s), "
                     f"rank {final['rank'] or final['ranks_before']}{energy})")
    else:
        lines.append("  no LoRA was trained (no round kept a pair)")
    return "\n".join(lines)
