"""`artaug demo`: the whole ArtAug loop on the embedded tiny model, in minutes on a CPU."""

from __future__ import annotations

import logging
import os
import time

from .args import add_launch_options, check_device, check_model_dir, check_output_dir, positive_int

logger = logging.getLogger("artaug_ext.cli")

DEMO_RECIPE = "smoke.toml"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="a small, complete ArtAug run on the embedded tiny model (CPU, no download)")
    p.add_argument("--out", default=None, help="run folder (default: a fresh ./artaug-demo, ./artaug-demo-2, ...); "
                   "an unfinished demo folder is resumed")
    p.add_argument("--model-dir", default=None, help="model root (default: ARTAUG_HOME, DIFFSYNTH_MODEL_BASE_PATH, ~/.cache/artaug)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    add_launch_options(p)
    p.set_defaults(run=run)


def demo_recipe_path() -> str:
    from importlib import resources

    return str(resources.files("artaug_recipes").joinpath(DEMO_RECIPE))


def fresh_folder(base: str = "artaug-demo") -> str:
    """`base`, or `base-2`, `base-3`, ...: the first that does not hold a finished demo."""
    from ..recipe.layout import SUMMARY

    n = 1
    while True:
        path = base if n == 1 else f"{base}-{n}"
        if not os.path.exists(os.path.join(path, SUMMARY)):
            return path
        n += 1


def run(args) -> int:
    from ..recipe.config import load_recipe
    from ..recipe.layout import RUN_LOCK

    recipe = load_recipe(demo_recipe_path())
    out = args.out or fresh_folder()
    check_output_dir("--out", out)
    launch = args.launch
    launch.open_folder(out, RUN_LOCK)  # before torch: a folder in use is refused at once, on every rank
    check_device("--device", args.device)
    check_model_dir(recipe.run.model, args.model_dir)
    from ..recipe.runner import run_recipe
    from .interact import set_threads
    from .run import format_summary

    set_threads(args.threads, args.device)
    n_prompts = len(recipe.prompts())
    say = print if launch.info.main else (lambda *a, **k: None)  # one launch, one log
    say(f"artaug demo: a SMALL run of the whole ArtAug loop on the embedded tiny model ({recipe.run.rounds} rounds, "
          f"{n_prompts} prompts, the heuristic critic and scorer), into {out}. It shows the machinery working end to "
          "end; it is not a result about image quality.", flush=True)
    t0 = time.perf_counter()
    summary = run_recipe(recipe, out, model_dir=args.model_dir, device=args.device,
                         progress=not args.no_progress and launch.info.main, launch=launch)
    say(format_summary(summary))
    check = summary.get("eval")
    if check:
        say(check["text"])
    say(f"done in {time.perf_counter() - t0:.0f} s.")
    if summary.get("report"):
        say(f"report: {os.path.join(summary['out'], summary['report'])}")
    if summary.get("final"):
        say(f"use it: artaug generate --model {recipe.run.model} --lora {os.path.join(out, summary['final']['lora'])} "
              f"--prompt \"{recipe.prompts()[0]}\" --out demo.png")
    return 0
