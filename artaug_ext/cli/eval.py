"""`artaug eval`: the base model against LoRAs (or LoRAs against each other, or a run's
rounds) on the same prompts and seeds, scored and laid out like the ArtAug paper's table."""

from __future__ import annotations

import logging
import os

from ..errors import UsageError
from .args import (
    DEFAULT_MAX_PIXELS,
    add_launch_options,
    add_quantize_options,
    check_device,
    check_image_size,
    check_lora_file,
    check_model_dir,
    check_output_dir,
    check_quantize_options,
    finite_float,
    image_size,
    lora_spec,
    positive_int,
)

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    from ..cards import base_models
    from ..eval.prompts import PROMPT_SETS
    from ..interact.scorers import JUDGES, SCORERS

    p = sub.add_parser("eval", help="compare the base model and LoRAs on the same prompts and seeds (the paper's table)")
    p.add_argument("--model", default="tiny", choices=base_models(), help="base model (default tiny)")
    p.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="PATH[:ALPHA]",
                   help="an arm with this LoRA merged (repeatable: one arm each); compared with the base")
    p.add_argument("--artaug", action="store_true", help="an arm with the released ArtAug LoRA (flux-dev)")
    p.add_argument("--run", dest="run_dir", default=None, metavar="RUN_DIR",
                   help="an `artaug run` folder: one arm per round (the rounds' LoRAs summed so far) and its final LoRA")
    p.add_argument("--no-base", action="store_true", help="compare the LoRA arms with the first of them, not the base")
    p.add_argument("--prompts", default="default",
                   help=f"a prompt set ({', '.join(PROMPT_SETS)}, tiny-heldout:N) or file: HPSv2 .json, PartiPrompts "
                        ".tsv, DrawBench .csv, T2I-CompBench .txt, GenEval .jsonl (default: default)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate a sample of N prompts (deterministic)")
    p.add_argument("--seeds", type=positive_int, default=2, help="images a prompt per arm, on the same seeds (default 2)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--scorer", default="heuristic",
                   help=f"{', '.join(SCORERS + JUDGES)}, or several joined with + (the paper's: aesthetic+pickscore+clip; "
                        "the tiny model's: heuristic+fidelity, the judge that compares with the exact scene)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--size", type=image_size, default=None, metavar="N|WxH", help="image size (default: the model's)")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--guidance", type=finite_float, default=3.5)
    p.add_argument("--batch-size", type=positive_int, default=4, help="images a DiT call (default 4)")
    p.add_argument("--out", required=True, help="eval folder (run again to resume; a folder of another eval is refused)")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--device", default=None)
    add_quantize_options(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    add_launch_options(p)
    p.set_defaults(run=run)


def arms_from_args(args) -> list:
    """The arms: the base (unless --no-base), then one per LoRA, ArtAug, or round of a run."""
    from ..cards import card
    from ..eval.run import Arm

    arms = [] if args.no_base else [Arm("base")]
    names = set()

    def add(name, loras):
        base_name, n = name, 2
        while name in names:
            name, n = f"{base_name}-{n}", n + 1
        names.add(name)
        arms.append(Arm(name, loras))

    if args.artaug:
        if card(args.model).companion_lora is None:
            raise UsageError(f"--artaug needs a model with the ArtAug LoRA (flux-dev), not {args.model!r}")
        from ..hub import resolve_model_files

        files = resolve_model_files(card(card(args.model).companion_lora), args.model_dir)
        add("artaug", [(files["lora"][0], 1.0)])
    for path, alpha in args.lora:
        check_lora_file("--lora", path)
        add(os.path.splitext(os.path.basename(path))[0] + ("" if alpha == 1.0 else f"@{alpha:g}"),
            [(os.path.abspath(path), alpha)])
    if args.run_dir:
        from ..recipe.layout import FINAL_LORA, cumulative_round_loras

        rounds = cumulative_round_loras(args.run_dir)
        if not rounds:
            raise UsageError(_no_round(args.run_dir))
        for name, loras in rounds:
            add(name, loras)
        final = os.path.join(args.run_dir, FINAL_LORA)
        if os.path.isfile(final):
            add("final", [(os.path.abspath(final), 1.0)])
    if len(arms) < 2:
        raise UsageError("nothing to compare: give --lora PATH (repeatable), --artaug or --run RUN_DIR "
                         "(with --no-base, at least two)")
    return arms


def _no_round(run_dir: str) -> str:
    """Why --run RUN_DIR has nothing to evaluate: not a run folder, a run in progress (and the
    process that holds it), or a run that ended without a round LoRA."""
    from ..files import lock_holder
    from ..recipe.layout import RUN_JSON

    if not os.path.isfile(os.path.join(run_dir, RUN_JSON)):
        return f"--run {run_dir}: not an `artaug run` folder (it has no {RUN_JSON}); give the --out of an `artaug run`"
    holder = lock_holder(run_dir, ".artaug-run-lock*")
    if holder:
        return (f"--run {run_dir}: the run has no finished round yet; it is in progress (process {holder} holds its "
                "lock): evaluate it once its first round is done")
    return (f"--run {run_dir}: the run has no finished round with a LoRA; finish it with the same `artaug run "
            f"RECIPE --out {run_dir}` (its summary says why it stopped)")


def run(args) -> int:
    from ..cards import card
    from ..eval.prompts import prompt_sizes, read_prompt_set

    check_output_dir("--out", args.out)
    arms = arms_from_args(args)
    prompts = read_prompt_set(args.prompts, limit=args.limit, seed=args.seed)  # a bad size column is refused here
    size = card(args.model).defaults.size
    width, height = args.size or (size, size)
    if prompt_sizes(prompts) is not None:
        logger.warning("%s: its size column is for `artaug interact` and `artaug run`; the eval makes every prompt "
                       "at %dx%d (--size)", args.prompts, width, height)
    check_image_size(width, height, args.max_pixels, "--size")
    from ..dist import Collective
    from ..eval.run import EVAL_LOCK, EvalConfig, format_table, run_eval

    launch = args.launch
    launch.open_folder(args.out, EVAL_LOCK, "eval folder")  # before torch: a folder in use is refused at once
    check_device("--device", args.device)
    check_quantize_options(args)
    check_model_dir(args.model, args.model_dir)
    from .interact import set_threads

    selection = None
    if args.run_dir:
        from ..recipe.layout import filter_scorer_of

        selection = filter_scorer_of(args.run_dir)
    cfg = EvalConfig(model=args.model, arms=arms, prompts=prompts, seeds=args.seeds, seed=args.seed, steps=args.steps,
                     width=width, height=height, guidance=args.guidance, scorer=args.scorer,
                     batch_size=args.batch_size, selection_scorer=selection, quantize=args.quantize,
                     text_encoders=args.text_encoders)
    cfg.validate()
    set_threads(args.threads, args.device)
    launch.doing = "the evaluation"
    result = run_eval(cfg, args.out, model_dir=args.model_dir, device=args.device,
                      progress=not args.no_progress and launch.info.main, collective=Collective(launch=launch))
    if not launch.info.main:
        return 0  # one launch, one log: the main process prints the table (the other ranks have no table)
    print(format_table(result))
    t = result["timing"]
    world = launch.info.world
    share = f" by rank 0 (each of the {world} ranks generates its share)" if world > 1 else ""
    print(f"{t['generated_images']} images generated{share} in {t['generation_seconds']:.0f} s; scoring {t['scoring_seconds']:.2f} s "
          f"({t['scorer_forward_passes']} scorer forward passes, {t['score_cache_hits']} from the cache)")
    print(f"report: {os.path.join(args.out, result['report'])}")
    return 0
