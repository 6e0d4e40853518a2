"""`artaug interact` and `artaug interact-export`: the interaction loop's pair datasets."""

from __future__ import annotations

import json
import logging
import os

from ..errors import UsageError
from .args import (
    DEFAULT_MAX_PIXELS,
    add_launch_options,
    add_quantize_options,
    check_device,
    check_image_size,
    check_input_file,
    check_lora_file,
    check_model_dir,
    check_output_dir,
    check_quantize_options,
    finite_float,
    image_size,
    lora_spec,
    positive_int,
)

logger = logging.getLogger("artaug_ext.cli")


def add_parsers(sub) -> None:
    from ..cards import base_models
    from ..interact.constants import DEFAULT_REGION_SCALE
    from ..interact.critics import CRITICS
    from ..interact.scorers import SCORERS

    p = sub.add_parser("interact", help="ArtAug interaction loop: generate, critique, enhance, filter; "
                       "writes a resumable pair dataset")
    p.add_argument("--prompts", required=True, help="prompt file: one prompt a line (# comments), JSONL with \"prompt\", "
                   "or any format `artaug eval` reads")
    p.add_argument("--out", required=True, help="run folder (created; re-run with the same settings to resume)")
    p.add_argument("--model", default="tiny", choices=base_models(), help="base model (default tiny)")
    p.add_argument("--model-dir", default=None, help="model root (default: ARTAUG_HOME, DIFFSYNTH_MODEL_BASE_PATH, ~/.cache/artaug)")
    p.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="PATH[:ALPHA]",
                   help="LoRA to merge first, any format artaug reads (repeatable; e.g. the previous round's)")
    p.add_argument("--critic", default="heuristic", choices=CRITICS,
                   help="heuristic (offline light meter, default), openai (OpenAI-compatible server), transformers (local Qwen2-VL)")
    p.add_argument("--critic-model", default=None, help="openai: served model name; transformers: folder or id")
    p.add_argument("--critic-base-url", default=None, help="openai: e.g. http://localhost:8000/v1 (or ARTAUG_CRITIC_BASE_URL)")
    p.add_argument("--critic-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--critic-convention", default=None, choices=["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "glm-v"],
                   help="grounding convention (default: from the model name)")
    p.add_argument("--critic-concurrency", type=positive_int, default=4, help="openai: requests in flight (default 4)")
    p.add_argument("--max-suggestions", type=positive_int, default=3, help="regions per image (default 3)")
    p.add_argument("--scorer", default="heuristic",
                   help=f"{', '.join(SCORERS)} or several joined with + (default heuristic)")
    p.add_argument("--margin", type=finite_float, default=0.0, help="keep a pair when every quality score gains more than this")
    p.add_argument("--relative-margin", action="store_true", help="margin relative to the original's score")
    p.add_argument("--alignment-tolerance", type=finite_float, default=0.0,
                   help="allowed drop of text-alignment scores (default 0)")
    p.add_argument("--images-per-prompt", type=positive_int, default=1)
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--size", type=image_size, default=None, metavar="N|WxH", help="image size (default: the model's)")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--seed", type=int, default=0, help="base seed; item seeds follow from it")
    p.add_argument("--region-scale", type=finite_float, default=DEFAULT_REGION_SCALE,
                   help=f"regional blend scale s_i (default {DEFAULT_REGION_SCALE})")
    p.add_argument("--guidance", type=finite_float, default=3.5, help="FLUX embedded guidance (default 3.5)")
    p.add_argument("--no-pictures", action="store_true", help="skip side-by-side pictures of kept pairs")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available; LOCAL_RANK under torchrun)")
    add_quantize_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's; 1 is much faster on a shared, busy CPU)")
    add_launch_options(p)
    p.set_defaults(run=run_interact)

    e = sub.add_parser("interact-export", help="merge a run's shards and export kept pairs for DiffSynth's trainer")
    e.add_argument("run_dir", help="folder written by `artaug interact`")
    e.add_argument("--out", required=True, help="export folder: original/ and enhanced/ with metadata.csv and metadata.jsonl")
    e.add_argument("--keep-fraction", type=finite_float, default=1.0, help="keep only the best share of kept pairs by gain")
    e.set_defaults(run=run_export)


def config_from_args(args):
    """The run's InteractConfig, with every check that needs no model done first."""
    from ..cards import card
    from ..eval.prompts import prompt_sizes, read_prompt_file
    from ..interact.config import InteractConfig
    from ..interact.keep import FilterConfig

    check_output_dir("--out", args.out)
    check_input_file("--prompts", args.prompts)
    items = read_prompt_file(args.prompts)  # a bad size column is refused here, before any model loads
    prompts = [item.prompt for item in items]
    for path, _ in args.lora:
        check_lora_file("--lora", path)
    size = card(args.model).defaults.size
    check_image_size(*(args.size or (size, size)), args.max_pixels, "--size")
    if args.critic == "openai":
        options = {"base_url": args.critic_base_url, "model": args.critic_model, "api_key_env": args.critic_key_env,
                   "convention": args.critic_convention, "max_concurrency": args.critic_concurrency,
                   "max_suggestions": args.max_suggestions}
    elif args.critic == "transformers":
        options = {"path": args.critic_model, "convention": args.critic_convention, "max_suggestions": args.max_suggestions}
    else:
        options = {"max_suggestions": args.max_suggestions}
    width, height = args.size if args.size else (None, None)
    return InteractConfig(
        prompts=prompts, model=args.model, loras=[(os.path.abspath(p), a) for p, a in args.lora],
        critic=args.critic, critic_options=options, scorer=args.scorer, images_per_prompt=args.images_per_prompt,
        steps=args.steps, height=height, width=width, seed=args.seed, region_scale=args.region_scale,
        guidance=args.guidance, filter=FilterConfig(margin=args.margin, relative=args.relative_margin,
                                                    alignment_tolerance=args.alignment_tolerance),
        pictures=not args.no_pictures, quantize=args.quantize, text_encoders=args.text_encoders,
        sizes=prompt_sizes(items))


def set_threads(threads: int | None, device: str | None) -> None:
    """--threads, or a warning when a busy CPU would make torch's threads fight."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores and torch.get_num_threads() > 1:
            logger.warning("the CPU is busy (load %.1f on %d cores): --threads 1 avoids torch thread thrash "
                           "(measured 6x faster here); keep the same value when resuming", load, cores)


def run_interact(args) -> int:
    from ..dist import Collective
    from ..interact.config import INTERACT_LOCK

    cfg = config_from_args(args)
    launch = args.launch
    launch.open_folder(args.out, INTERACT_LOCK)  # before torch: a folder in use is refused at once, on every rank
    check_device("--device", args.device)
    check_quantize_options(args)
    check_model_dir(args.model, args.model_dir)
    from ..interact.loop import run_interact as run_loop

    set_threads(args.threads, args.device)
    launch.doing = "the interaction"
    collective = Collective(launch=launch)
    stats = run_loop(cfg, args.out, model_dir=args.model_dir, device=args.device,
                     progress=not args.no_progress and launch.info.main, collective=collective)
    if launch.info.world > 1:  # one launch, one log: the main process prints the whole launch's counts
        every = collective.gather(stats)
        if not launch.info.main:
            return 0
        whole = next((s for s in every if s.get("merged") is not None), stats)  # the last rank's: every shard done
        stats = dict(whole, processed=sum(s["processed"] for s in every), seconds=max(s["seconds"] for s in every))
    rate = stats["preference_rate"]
    print(f"{args.out}: {stats['items']} items ({stats['processed']} new in {stats['seconds']:.1f}s), "
          f"{stats['enhanced']} enhanced, {stats['kept']} kept; enhanced scored higher in "
          f"{stats['enhanced_preferred']}/{stats['enhanced']}" + (f" ({rate:.0%})" if rate is not None else "")
          + f"; {stats['usable_suggestions']} of {stats['suggestions']} suggestions had a usable local prompt")
    logger.info("stats: %s", json.dumps(stats))
    return 0


def run_export(args) -> int:
    from ..interact.export import export_pairs

    if not os.path.isdir(os.path.join(args.run_dir, "shards")):
        raise UsageError(f"{args.run_dir}: not a run folder of `artaug interact` (no shards/)")
    check_output_dir("--out", args.out)
    n = export_pairs(args.run_dir, args.out, keep_fraction=args.keep_fraction)
    print(f"exported {n} kept pairs to {args.out}/original and {args.out}/enhanced (metadata.csv, metadata.jsonl)")
    return 0
