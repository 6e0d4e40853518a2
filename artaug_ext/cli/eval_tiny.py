"""`artaug eval-tiny`: caption fidelity of the tiny model on held-out prompts."""

from __future__ import annotations

import json

from .args import check_device, check_model_dir, check_output_file, multiple_of_16, positive_int


def add_parser(sub) -> None:
    from ..cards import CARDS

    tiny = sorted(n for n, c in CARDS.items() if c.is_tiny) + ["tiny"]
    p = sub.add_parser("eval-tiny", help="caption fidelity of the tiny model on held-out prompts")
    p.add_argument("--model", default="tiny", choices=sorted(tiny), help="tiny model to evaluate (default tiny)")
    p.add_argument("--model-dir", default=None, help="model root (default: ARTAUG_HOME or ~/.cache/artaug)")
    p.add_argument("-n", "--prompts", type=positive_int, default=64, help="held-out prompts (default 64)")
    p.add_argument("--lighting-pairs", type=positive_int, default=32, help="dim/bright prompt pairs (default 32)")
    p.add_argument("--size", type=multiple_of_16, default=None, help="image size (default: the model's, 256)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--grid", default=None, help="also save a grid of the first 12 images with captions (PNG)")
    p.set_defaults(run=run)


def run(args) -> int:
    for option, path in (("--json", args.json), ("--grid", args.grid)):
        if path:
            check_output_file(option, path)
    check_device("--device", args.device)
    check_model_dir(args.model, args.model_dir)
    from ..eval_tiny import evaluate, format_report, save_grid
    from ..pipeline import load_pipeline

    pipe = load_pipeline(args.model, model_dir=args.model_dir, device=args.device)
    result = evaluate(pipe, n_prompts=args.prompts, n_lighting=args.lighting_pairs, size=args.size,
                      steps=args.steps, seed=args.seed, keep_images=12 if args.grid else 0)
    images = result.pop("_images", None)
    if args.grid and images:
        save_grid(images, args.grid)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print(format_report(result))
    return 0
