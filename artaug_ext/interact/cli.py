"""`artaug interact` and `artaug interact-export`: the CLI side of the interaction loop.

`artaug_ext/cli.py` adds these with `add_interact_parser(sub)` and dispatches `args.func(args)`
for them; `python -m artaug_ext.interact.cli interact ...` runs them on their own.
Errors are ValueError (one line through the `artaug` error handler).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger("artaug_ext.interact.cli")


def positive_int(text: str) -> int:
    """argparse type: a positive integer (shared with the main `artaug` parser)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _size(text: str) -> tuple[int, int]:
    """"256" or "512x384" (width x height), multiples of 16."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use N or WIDTHxHEIGHT") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or any(v <= 0 or v % 16 for v in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive multiples of 16 (FLUX works on 16-pixel patches)")
    return parts[0], parts[1]


def _lora(text: str) -> tuple[str, float]:
    path, _, alpha = text.rpartition(":") if ":" in text and not os.path.exists(text) else (text, "", "1.0")
    try:
        return path, float(alpha)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: use PATH or PATH:ALPHA") from None


def add_interact_parser(subparsers) -> None:
    """Add `interact` and `interact-export` to the `artaug` subcommands."""
    from ..pipeline import known_models
    from .critics import CRITICS
    from .enhance import DEFAULT_REGION_SCALE

    p = subparsers.add_parser("interact", help="ArtAug interaction loop: generate, critique, enhance, filter; "
                              "writes a resumable pair dataset")
    p.add_argument("--prompts", required=True, help="prompt file: one prompt a line (# comments), or JSONL with \"prompt\"")
    p.add_argument("--out", required=True, help="run folder (created; re-run with the same settings to resume)")
    p.add_argument("--model", default="tiny", choices=known_models(), help="base model (default tiny)")
    p.add_argument("--model-dir", default=None, help="model root (default: ARTAUG_HOME, DIFFSYNTH_MODEL_BASE_PATH, ~/.cache/artaug)")
    p.add_argument("--lora", action="append", default=[], type=_lora, metavar="PATH[:ALPHA]",
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
    p.add_argument("--scorer", default="heuristic", help="heuristic, aesthetic, pickscore, clip or a+b+c (default heuristic)")
    p.add_argument("--margin", type=float, default=0.0, help="keep a pair when every quality score gains more than this")
    p.add_argument("--relative-margin", action="store_true", help="margin relative to the original's score")
    p.add_argument("--alignment-tolerance", type=float, default=0.0, help="allowed drop of text-alignment scores (default 0)")
    p.add_argument("--images-per-prompt", type=positive_int, default=1)
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--size", type=_size, default=None, metavar="N|WxH", help="image size (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="base seed; item seeds follow from it")
    p.add_argument("--region-scale", type=float, default=DEFAULT_REGION_SCALE,
                   help=f"regional blend scale s_i (default {DEFAULT_REGION_SCALE})")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX embedded guidance (default 3.5)")
    p.add_argument("--no-pictures", action="store_true", help="skip side-by-side pictures of kept pairs")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available; LOCAL_RANK under torchrun)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's; 1 is much faster on a shared, busy CPU)")
    p.set_defaults(func=cmd_interact)

    e = subparsers.add_parser("interact-export", help="merge a run's shards and export kept pairs for DiffSynth's trainer")
    e.add_argument("run_dir", help="folder written by `artaug interact`")
    e.add_argument("--out", required=True, help="export folder: original/ and enhanced/ with metadata.csv and metadata.jsonl")
    e.add_argument("--keep-fraction", type=float, default=1.0, help="keep only the best share of kept pairs by gain")
    e.set_defaults(func=cmd_interact_export)


def config_from_args(args):
    from .dataset import InteractConfig, read_prompts
    from .scorers import FilterConfig

    options = {}
    if args.critic == "openai":
        options = {"base_url": args.critic_base_url, "model": args.critic_model, "api_key_env": args.critic_key_env,
                   "convention": args.critic_convention, "max_concurrency": args.critic_concurrency,
                   "max_suggestions": args.max_suggestions}
    elif args.critic == "transformers":
        options = {"path": args.critic_model, "convention": args.critic_convention, "max_suggestions": args.max_suggestions}
    else:
        options = {"max_suggestions": args.max_suggestions}
    for path, _ in args.lora:
        if not os.path.isfile(path):
            raise ValueError(f"--lora {path}: no such file")
    width, height = args.size if args.size else (None, None)
    return InteractConfig(
        prompts=read_prompts(args.prompts), model=args.model, loras=[(os.path.abspath(p), a) for p, a in args.lora],
        critic=args.critic, critic_options=options, scorer=args.scorer, images_per_prompt=args.images_per_prompt,
        steps=args.steps, height=height, width=width, seed=args.seed, region_scale=args.region_scale,
        guidance=args.guidance, filter=FilterConfig(margin=args.margin, relative=args.relative_margin,
                                                    alignment_tolerance=args.alignment_tolerance),
        pictures=not args.no_pictures)


def cmd_interact(args) -> int:
    from .critics import CriticError
    from .dataset import run_interact

    cfg = config_from_args(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores and torch.get_num_threads() > 1:
            logger.warning("the CPU is busy (load %.1f on %d cores): --threads 1 avoids torch thread thrash "
                           "(measured 6x faster here); keep the same value when resuming", load, cores)
    os.makedirs(args.out, exist_ok=True)
    try:
        stats = run_interact(cfg, args.out, model_dir=args.model_dir, device=args.device,
                             progress=not args.no_progress)
    except CriticError as e:
        raise ValueError(str(e)) from None
    rate = stats["preference_rate"]
    print(f"{args.out}: {stats['items']} items ({stats['processed']} new in {stats['seconds']:.1f}s), "
          f"{stats['enhanced']} enhanced, {stats['kept']} kept; enhanced scored higher in "
          f"{stats['enhanced_preferred']}/{stats['enhanced']}" + (f" ({rate:.0%})" if rate is not None else ""))
    logger.info("stats: %s", json.dumps(stats))
    return 0


def cmd_interact_export(args) -> int:
    from .dataset import export_pairs

    if not os.path.isdir(os.path.join(args.run_dir, "shards")):
        raise ValueError(f"{args.run_dir}: not a run folder of `artaug interact` (no shards/)")
    n = export_pairs(args.run_dir, args.out, keep_fraction=args.keep_fraction)
    print(f"exported {n} kept pairs to {args.out}/original and {args.out}/enhanced (metadata.csv, metadata.jsonl)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (the same subcommands as `artaug interact` / `artaug interact-export`)."""
    from ..hub import HubError

    parser = argparse.ArgumentParser(prog="artaug")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    add_interact_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose + 1, 2), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (HubError, ValueError, KeyError) as e:
        print(f"artaug: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
