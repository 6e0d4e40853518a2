"""Does the method work? ArtAug's differential LoRA on the embedded tiny model, measured on
HELD-OUT prompts and seeds that never entered training.

Training: `artaug run` on procedural scenes of the tiny model's training grammar under lighting
the heuristic critic finds fault with (dim, overexposed, backlit, bright), the heuristic critic
and scorer, 2 rounds. Held out: `tiny-heldout-lit` (attribute combinations the tiny model never
saw, under the same lighting conditions and normal light) with seeds from 10000.

Arms, each against the base model on the same held-out prompts and seeds:
  batched-1     the batched differential LoRA after round 1
  batched-2     after round 2 (round 1 + round 2, the run's final LoRA before truncation)
  per-pair      a LoRA_1/LoRA_2 per pair of round 1 (a subset of its pairs when --per-pair-pairs
                caps them), averaged exactly
  sft           one LoRA on round 1's enhanced images only (the ablation)
  tone          NO training: the base's own images with a global tone correction (auto-contrast,
                then a gamma that moves mean luma to 0.45). The heuristic that filters pairs also
                scores them, so a LoRA that only learned a global tone shift must not pass for
                the method working: this arm shows what such a shift alone scores.

Measures (win rate = share of pairs where the arm's image scores higher, ties half; 95%
bootstrap interval over prompts with their seeds nested):
  quality       the heuristic scorer's quality (the filter's own score)
  separation    Delta E between the analyser-segmented object and its background: a measure that
                played no part in selecting pairs (the critic and scorer judge 3x3 cells of pixel
                statistics; neither segments the object), so it checks whether the images got
                better in a way the selection did not reward by construction
  alignment     the caption analyser's match rate (colour, shape, position, background)

Target: batched beats the base with the win-rate interval's lower bound above 50% on quality,
while alignment drops by no more than 5 points. Every arm is reported as measured.

    python benchmarks/bench_method.py --out runs/bench_method            # about 15-25 min on 2 cores
    python benchmarks/bench_method.py --out /tmp/bm --quick              # a few minutes, small numbers
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def training_prompts(n: int) -> list[str]:
    """Training-grammar captions, one object each, under the held-out set's departures from normal light in turn."""
    from artaug_ext import scenes
    from artaug_ext.eval.prompts import heldout_lightings

    lightings = [x for x in heldout_lightings() if x != "normal"]
    out, i = [], 0
    while len(out) < n:
        s = scenes.random_scene(20_000 + i, max_objects=1, held_out=False, lighting=lightings[len(out) % len(lightings)])
        i += 1
        if s.caption not in out:
            out.append(s.caption)
    return out


def tone_correct(image):
    """Auto-contrast (1% clipped at each end), then the gamma that brings mean luma to 0.45."""
    from PIL import Image, ImageOps

    im = ImageOps.autocontrast(image.convert("RGB"), cutoff=1)
    x = np.asarray(im, dtype=np.float64) / 255.0
    luma = float((x @ np.array([0.299, 0.587, 0.114])).mean())
    gamma = np.log(0.45) / np.log(min(max(luma, 1e-3), 0.999))
    return Image.fromarray(np.clip(255 * x ** gamma + 0.5, 0, 255).astype(np.uint8))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train-prompts", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="steps per stage")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate of every stage")
    p.add_argument("--eval-prompts", type=int, default=40)
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--per-pair-pairs", type=int, default=6, help="pairs of round 1 for the per-pair arm")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the plumbing in a few minutes")
    p.add_argument("--json", default=None, help="write the figures here (default: OUT/method.json)")
    args = p.parse_args()
    if args.quick:
        args.train_prompts, args.steps, args.eval_prompts, args.per_pair_pairs = 8, 10, 10, 2
    return args


def train_arms(args, out: str, train_settings: dict):
    """The run (batched arms, one per round) and the per-pair and sft LoRAs on round 1's pairs."""
    from artaug_ext.eval.run import Arm
    from artaug_ext.interact.pairs import read_pairs
    from artaug_ext.pipeline import load_pipeline
    from artaug_ext.recipe.config import recipe_from_dict
    from artaug_ext.recipe.layout import cumulative_round_loras, round_dir
    from artaug_ext.recipe.runner import run_recipe
    from artaug_ext.train.cache import load_cache
    from artaug_ext.train.differential import LoRATrainSettings, train_round_lora

    recipe = recipe_from_dict({
        "run": {"model": "tiny", "rounds": args.rounds, "seed": 0, "stop_mean_gain": -1.0, "name": "bench_method"},
        "data": {"prompts": training_prompts(args.train_prompts), "steps": 8},
        "critic": {"backend": "heuristic"}, "filter": {"scorer": "heuristic"}, "train": train_settings})
    t0 = time.perf_counter()
    summary = run_recipe(recipe, os.path.join(out, "run"), progress=False)
    run_seconds = time.perf_counter() - t0
    arms = [Arm("base")] + [Arm(name.replace("round-", "batched-"), loras)
                            for name, loras in cumulative_round_loras(os.path.join(out, "run"))]
    pipe = load_pipeline("tiny")
    folder = round_dir(os.path.join(out, "run"), 1)
    pairs = read_pairs(os.path.join(folder, "interact"))
    cache = load_cache(os.path.join(folder, "cache"), [q.id for q in pairs])
    chosen = sorted(range(len(pairs)), key=lambda i: -(pairs[i].gain or 0))[:args.per_pair_pairs]
    for mode, sub, name in (("per-pair", cache.subset(sorted(chosen)), "per-pair"), ("sft", cache, "sft")):
        settings = LoRATrainSettings(**{**train_settings, "mode": mode, "batch_size": 1 if mode == "per-pair" else 4})
        lora = train_round_lora(pipe.dit, sub, settings, os.path.join(out, name), progress=False)
        arms.append(Arm(name, [(lora.path, 1.0)]))
    return recipe, summary, arms, pipe, chosen, run_seconds


def tone_control(out: str, prompts, seeds: int, scorer: str, pipe) -> dict:
    """The control: the base's own held-out images, tone-corrected, against themselves."""
    from artaug_ext.eval.layout import image_path
    from artaug_ext.eval.run import Arm, EvalConfig, run_eval
    from artaug_ext.files import atomic_write_bytes
    from artaug_ext.interact.images import load_image, png_bytes

    ctrl_dir = os.path.join(out, "control")
    ctrl = EvalConfig(model="tiny", arms=[Arm("base"), Arm("tone")], prompts=prompts, seeds=seeds, seed=10_000,
                      scorer=scorer, n_boot=2000)
    for pi in range(len(prompts)):
        for k in range(seeds):
            src = image_path(os.path.join(out, "eval"), "base", pi, k)
            for arm, image in (("base", load_image(src)), ("tone", tone_correct(load_image(src)))):
                dst = image_path(ctrl_dir, arm, pi, k)
                if not os.path.isfile(dst):
                    atomic_write_bytes(dst, png_bytes(image))
    return run_eval(ctrl, ctrl_dir, pipe=pipe, progress=False)


def arm_rows(comparisons: dict) -> list[dict]:
    rows = []
    for arm, m in comparisons.items():
        q, s, a = m["quality"], m["separation"], m["match"]
        rows.append({"arm": arm, "quality_win": q["win_rate"], "quality_win_ci": q["win_ci"], "quality_diff": q["mean_diff"],
                     "separation_win": s["win_rate"], "separation_win_ci": s["win_ci"], "separation_diff": s["mean_diff"],
                     "alignment_base": a["mean_b"], "alignment_arm": a["mean_a"],
                     "alignment_drop_points": 100 * (a["mean_b"] - a["mean_a"]),
                     "target_met": bool(q["win_ci"][0] > 0.5 and 100 * (a["mean_b"] - a["mean_a"]) <= 5)})
    return rows


def print_figures(figures: dict, path: str) -> None:
    held = figures["held_out"]
    print(f"held-out: {held['prompts']} prompts x {held['seeds']} seeds (tiny-heldout-lit, seeds from 10000); "
          f"trained on {figures['training_prompts']} prompts, {len(figures['rounds'])} round(s)")
    for r in figures["rounds"]:
        print(f"  round {r['round']}: {r['kept']} of {r['items']} kept, mean gain {r['mean_gain']:.4f}")
    print(f"{'arm':<11}{'quality win [95% CI]':<28}{'separation win [95% CI]':<30}{'alignment (base -> arm)':<26}target")
    for r in figures["arms"]:
        qlo, qhi = r["quality_win_ci"]
        slo, shi = r["separation_win_ci"]
        print(f"{r['arm']:<11}{r['quality_win']:.1%} [{qlo:.1%}, {qhi:.1%}]{'':<6}"
              f"{r['separation_win']:.1%} [{slo:.1%}, {shi:.1%}]{'':<8}"
              f"{r['alignment_base']:.1%} -> {r['alignment_arm']:.1%}{'':<8}{'met' if r['target_met'] else 'missed'}")
    print(f"figures: {path}  ({figures['seconds']['total']:.0f} s)")


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("ARTAUG_THREADS", "2")))
    from artaug_ext.eval.prompts import read_prompt_set
    from artaug_ext.eval.run import EvalConfig, run_eval

    t0 = time.perf_counter()
    out = os.path.abspath(args.out)
    train_settings = dict(mode="batched", rank=8, lr=args.lr, steps_stage1=args.steps, steps_stage2=args.steps, batch_size=4,
                          resolution=128, checkpoint_every=10)
    recipe, summary, arms, pipe, chosen, t_run = train_arms(args, out, train_settings)
    t_train = time.perf_counter() - t0

    prompts = read_prompt_set(f"tiny-heldout-lit:{args.eval_prompts}")
    trained = set(recipe.prompts())
    assert not trained & {it.prompt for it in prompts}, "a held-out prompt was trained on"
    scorer = "heuristic+separation+analyser"
    cfg = EvalConfig(model="tiny", arms=arms, prompts=prompts, seeds=args.eval_seeds, seed=10_000, scorer=scorer,
                     n_boot=2000)
    result = run_eval(cfg, os.path.join(out, "eval"), pipe=pipe, progress=False)
    control = tone_control(out, prompts, args.eval_seeds, scorer, pipe)
    rows = arm_rows({**result["comparisons"], **control["comparisons"]})
    figures = {"rounds": summary["rounds"], "arms": rows, "held_out": {"prompts": len(prompts), "seeds": args.eval_seeds,
                                                                       "set": f"tiny-heldout-lit:{args.eval_prompts}"},
               "training_prompts": len(trained), "per_pair_pairs": len(chosen), "quick": args.quick,
               "settings": {"steps_per_stage": args.steps, "lr": args.lr, "rank": 8, "batch_size": 4, "resolution": 128},
               "seconds": {"run": round(t_run, 1), "per_pair_and_sft": round(t_train - t_run, 1),
                           "total": round(time.perf_counter() - t0, 1)}}
    path = args.json or os.path.join(out, "method.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)
    print_figures(figures, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
