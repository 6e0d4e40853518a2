"""Does the method work? ArtAug's differential LoRA on the embedded tiny model, measured on
HELD-OUT prompts and seeds that never entered training, against the exact scenes they describe.

Training: `artaug run` on procedural scenes of the tiny model's training grammar (one to three
objects: with one object every local prompt of the heuristic critic is the global prompt, an
identity blend that is dropped) under the held-out set's lightings in turn, the heuristic critic
and scorer, 2 rounds. Held out: `tiny-heldout-lit/dev` (or /test; `--heldout multi`: the
multi-object set), attribute combinations the tiny model never saw, with seeds from 10000.
Settings are chosen on dev; test is measured once, for the configuration chosen there.

Arms, each against the base model on the same held-out prompts and seeds:
  batched-1     the batched differential LoRA after round 1 (stage 1 + stage 2 steps)
  batched-2     after round 2 (round 1 + round 2, the run's final LoRA before truncation)
                (--mode dpo: dpo-1, dpo-2, the run's Flow-DPO LoRAs: one paired stage of --steps)
  sft           one LoRA on round 1's enhanced images only, on the same latent cache, at equal
                compute: stage 1 + stage 2 steps (batched), or --steps x the DPO sample cost
                (dpo: a step trains both images of a pair and runs the reference: 8/3 images)
  batched       (--mode dpo) the batched differential LoRA on round 1's cache, at the run's
                resolution, stage 1 + stage 2 = the sft arm's steps
  dpo-b{beta}   (--dpo-betas) more Flow-DPO LoRAs on round 1's cache, another beta each
  dpo-w{weight} (--dpo-sft-weights) more Flow-DPO LoRAs, another train.dpo_sft_weight each
  dpo-scored    (--scored-arm, with --keep enhanced) Flow-DPO on the pairs the scorer kept only
  per-pair      (--per-pair) a LoRA_1/LoRA_2 per pair of round 1 (a subset: --per-pair-pairs), averaged
  tone          NO training: the base's own images, globally tone-corrected (auto-contrast, then a
                gamma that moves mean luma to 0.45)
  cells         NO training: the base's own images with the cells the critic flags (the boxes of its
                usable suggestions) tone-corrected, each on its own
  oracle        NO training: regional enhancement at inference, the base generating each held-out
                prompt with the critic's usable suggestions on its own base image blended in
                (interact/enhance.py); an image with none is the base image itself
--full-res trains the differential and sft LoRAs at the generation resolution (default: 128 px).

Measures (win rate = share of pairs where the arm's image is better, ties half; 95% bootstrap
interval over prompts, seeds nested; eval/stats.py):
  render fidelity   fidelity_delta_e (mean Delta E*ab) and fidelity_rgb (mean absolute RGB error)
                    against `scenes.render` of the prompt's scene: lower is better (the headline)
  lighting          fidelity_lighting: the share of images whose nearest lighting render is the named one
  alignment         the caption analyser's match rate (colour, shape, position, background)
  selection score   the heuristic scorer's quality: the filter's own score (selection score: not
                    independent; a LoRA trained on the pairs it preferred is expected to raise it)

Target: batched improves render fidelity (the Delta E win rate's interval above 50%), lighting
accuracy no more than 2 points down, and batched-1 no worse than sft at equal steps on Delta E.

Every run appends its configuration to a ledger (--ledger, default beside --out), so the JSON says
how many configurations were run on dev before the reported one.

    python benchmarks/bench_method.py --out runs/bench_method_dev                  # dev, the mandatory arms
    python benchmarks/bench_method.py --out runs/bench_method_test --split test    # once, the chosen settings
    python benchmarks/bench_method.py --out /tmp/bm --quick                        # a few minutes, small numbers
    python benchmarks/bench_method.py --out runs/bm_recipe --recipe recipes/tiny_artaug.toml --heldout multi
                                      # the shipped recipe as it is: its run, then the arms on its round 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

SELECTION = "heuristic"  # the run's filter scorer
SCORER = "heuristic+fidelity+analyser"
HEADLINE = ("fidelity_delta_e", "fidelity_rgb", "fidelity_lighting", "match", "quality")
EVAL_SEED = 10_000


def training_prompts(n: int, objects: tuple[int, ...] = (1, 2, 3)) -> list[str]:
    """Training-grammar captions of one, two and three objects in turn (a third each: the grammar's
    own draw gives mostly one, whose local prompts are all identities), under the held-out set's
    departures from normal light in turn; none is a held-out combination (`held_out=False`).
    `objects=(2, 3)`: two and three in turn (no one-object scene: its item is never enhanced)."""
    from artaug_ext import scenes
    from artaug_ext.eval.prompts import heldout_lightings

    lightings = [x for x in heldout_lightings() if x != "normal"]
    out, i = [], 0
    while len(out) < n:
        s = scenes.random_scene(20_000 + i, max_objects=3, held_out=False, lighting=lightings[len(out) % len(lightings)])
        i += 1
        if len(s.objects) == objects[len(out) % len(objects)] and s.caption not in out:
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


def box_pixels(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised (x0, y0, x1, y1) box as pixel bounds, at least one pixel each way."""
    x0, y0 = int(round(box[0] * width)), int(round(box[1] * height))
    x1, y1 = max(int(round(box[2] * width)), x0 + 1), max(int(round(box[3] * height)), y0 + 1)
    return min(x0, width - 1), min(y0, height - 1), min(x1, width), min(y1, height)


def tone_correct_cells(image, boxes):
    """The image with each box tone-corrected on its own statistics (`tone_correct` of the crop)."""
    out = image.convert("RGB").copy()
    for box in boxes:
        x0, y0, x1, y1 = box_pixels(box, *out.size)
        out.paste(tone_correct(image.convert("RGB").crop((x0, y0, x1, y1))), (x0, y0))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=("dev", "test"), default="dev",
                   help="the held-out part measured: choose settings on dev, report test once (default dev)")
    p.add_argument("--heldout", choices=("lit", "multi"), default="lit",
                   help="tiny-heldout-lit (one object) or tiny-heldout-multi (two or three objects)")
    p.add_argument("--train-prompts", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="steps per stage (sft: twice this)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate of every stage")
    p.add_argument("--margin", type=float, default=0.0,
                   help="the filter's margin: keep a pair whose quality gain exceeds it (default 0, the recipes')")
    p.add_argument("--eval-prompts", type=int, default=40)
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--full-res", action="store_true", help="train every LoRA at the generation resolution")
    p.add_argument("--mode", choices=("batched", "dpo"), default="batched", help="the run's training mode")
    p.add_argument("--keep", choices=("score", "enhanced"), default="score",
                   help="the pairs a round trains on: the scorer's verdict, or every enhanced pair")
    p.add_argument("--dpo-beta", type=float, default=500.0, help="the run's Flow-DPO beta (--mode dpo)")
    p.add_argument("--dpo-betas", default="", help="comma-separated: more DPO arms on round 1's cache")
    p.add_argument("--dpo-sft-weight", type=float, default=0.0, help="the run's train.dpo_sft_weight (--mode dpo)")
    p.add_argument("--dpo-sft-weights", default="",
                   help="comma-separated: more DPO arms on round 1's cache (the run's beta), another sft weight each")
    p.add_argument("--scored-arm", action="store_true",
                   help="(--keep enhanced) also a DPO arm on the pairs the scorer kept")
    p.add_argument("--arm", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="another LoRA on round 1's cache: the run's training settings with these changed, e.g. "
                        "'long:steps_stage1=160,steps_stage2=160' (repeatable)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--recipe", default=None,
                   help="a recipe file: its run as it is (model, prompts, rounds, [filter], [train]); the training "
                        "options above are then taken from it")
    p.add_argument("--per-pair", action="store_true", help="also the per-pair arm")
    p.add_argument("--per-pair-pairs", type=int, default=6, help="pairs of round 1 for the per-pair arm")
    p.add_argument("--model", default="tiny", help="tiny (tiny-random: plumbing only, its images are noise)")
    p.add_argument("--size", type=int, default=None, help="generation size (default: the model's)")
    p.add_argument("--gen-steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--ledger", default=None, help="configurations run so far (default: OUT/../bench_method_ledger.jsonl)")
    p.add_argument("--prior-dev-configs", type=int, default=0,
                   help="configurations measured on these held-out prompts outside the ledger (before it existed)")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the plumbing in a few minutes")
    p.add_argument("--json", default=None, help="write the figures here (default: OUT/method.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_prompts, args.steps, args.eval_prompts, args.per_pair_pairs = 8, 10, 10, 2
    args.arms = [parse_arm(p, text) for text in args.arm]
    return args


def parse_arm(parser: argparse.ArgumentParser, text: str) -> tuple[str, dict]:
    """'name:key=value,...' as (name, {key: value}), keys checked against the training settings."""
    from artaug_ext.train.settings import LoRATrainSettings

    name, _, changes = text.partition(":")
    fields = {f.name: f.type for f in dataclasses.fields(LoRATrainSettings)}
    out = {}
    for item in filter(None, changes.split(",")):
        key, eq, value = item.partition("=")
        if not name or not eq or key not in fields:
            parser.error(f"--arm {text!r}: use NAME:KEY=VALUE,... with keys of [train] ({', '.join(sorted(fields))})")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        out[key] = value
    if not out:
        parser.error(f"--arm {text!r}: no change to the run's settings; use NAME:KEY=VALUE,...")
    return name, out


def train_settings(args) -> dict:
    from artaug_ext.pipeline import default_size

    if args.recipe:
        from artaug_ext.recipe.config import load_recipe
        from artaug_ext.train.settings import LoRATrainSettings

        t = load_recipe(args.recipe).train
        return {k: v for k, v in dataclasses.asdict(t).items() if v != getattr(LoRATrainSettings(), k)}
    resolution = None if args.full_res else min(128, args.size or default_size(args.model))
    out = dict(mode=args.mode, rank=args.rank, lr=args.lr, steps_stage1=args.steps, steps_stage2=args.steps,
               batch_size=args.batch_size, resolution=resolution, checkpoint_every=10)
    if args.mode == "dpo":
        out["dpo_beta"] = args.dpo_beta
        if args.dpo_sft_weight:
            out["dpo_sft_weight"] = args.dpo_sft_weight
    return out


def configuration(args) -> dict:
    """What the figures depend on besides the split: the settings a choice on dev is made among
    (keys added since the ledger began appear only when they differ from the old behaviour)."""
    extra = {}
    if args.keep != "score":
        extra["keep"] = args.keep
    if args.dpo_betas:
        extra["dpo_betas"] = args.dpo_betas
    if args.dpo_sft_weights:
        extra["dpo_sft_weights"] = args.dpo_sft_weights
    if args.scored_arm:
        extra["scored_arm"] = True
    arms = {"arms": dict(args.arms)} if args.arms else {}
    if args.recipe:
        from artaug_ext.recipe.config import load_recipe

        return {"recipe": load_recipe(args.recipe).to_dict(), "heldout": args.heldout, "eval_prompts": args.eval_prompts,
                "eval_seeds": args.eval_seeds, **arms}
    return {"model": args.model, "size": args.size, "gen_steps": args.gen_steps, "train_prompts": args.train_prompts,
            "rounds": args.rounds, "train": train_settings(args), "heldout": args.heldout,
            "eval_prompts": args.eval_prompts, "eval_seeds": args.eval_seeds, "per_pair": args.per_pair,
            "per_pair_pairs": args.per_pair_pairs if args.per_pair else None,
            **({"margin": args.margin} if args.margin else {}), **extra, **arms}  # the default margin: as the ledger's first entries


def sft_steps(settings: dict) -> int:
    """The sft arm's steps, at the run's compute: stage 1 + stage 2 (batched), or a DPO stage's
    steps x its sample cost (both images forward and backward, and the reference's forward)."""
    from artaug_ext.recipe.plan import DPO_SAMPLE_COST

    if settings.get("mode") == "dpo":
        return round(settings["steps_stage2"] * DPO_SAMPLE_COST)
    return settings["steps_stage1"] + settings["steps_stage2"]


def ledger_counts(path: str, config: dict) -> dict:
    """From the ledger: the configurations run on dev other than `config`, whether `config` was
    run on dev, and how many times test was measured before."""
    from artaug_ext.files import read_jsonl

    records = read_jsonl(path, repair=True, what="bench ledger")
    same = json.dumps(config, sort_keys=True)
    dev = {json.dumps(r["config"], sort_keys=True) for r in records if r["split"] == "dev"}
    return {"dev_configs_before": len(dev - {same}), "config_run_on_dev": same in dev,
            "test_runs_before": sum(r["split"] == "test" for r in records)}


def train_arms(args, out: str, settings: dict):
    """The run (batched arms, one per round), and the sft (and per-pair) LoRAs on round 1's cache."""
    from artaug_ext.eval.run import Arm
    from artaug_ext.files import read_json
    from artaug_ext.interact.pairs import read_pairs
    from artaug_ext.pipeline import load_pipeline
    from artaug_ext.recipe.config import recipe_from_dict
    from artaug_ext.recipe.layout import cumulative_round_loras, round_dir
    from artaug_ext.recipe.runner import run_recipe
    from artaug_ext.train.cache import load_cache
    from artaug_ext.train.differential import STAGE_RECORD, LoRATrainSettings, train_round_lora

    if args.recipe:
        from artaug_ext.recipe.config import load_recipe

        recipe = load_recipe(args.recipe)
        recipe.eval = None  # the bench's own held-out eval judges it
        args.model = recipe.run.model
    else:
        data = {"prompts": training_prompts(args.train_prompts), "steps": args.gen_steps or 8}
        if args.size:
            data["size"] = args.size
        recipe = recipe_from_dict({
            "run": {"model": args.model, "rounds": args.rounds, "seed": 0, "stop_mean_gain": -1.0, "name": "bench_method"},
            "data": data, "critic": {"backend": "heuristic"},
            "filter": {"scorer": SELECTION, "margin": args.margin, "keep": args.keep}, "train": settings})
    mode = recipe.train.mode
    t0 = time.perf_counter()
    summary = run_recipe(recipe, os.path.join(out, "run"), progress=False)
    run_seconds = time.perf_counter() - t0
    arms = [Arm("base")] + [Arm(name.replace("round-", f"{mode}-"), loras)
                            for name, loras in cumulative_round_loras(os.path.join(out, "run"))]
    pipe = load_pipeline(args.model)
    folder = round_dir(os.path.join(out, "run"), 1)
    kept = read_pairs(os.path.join(folder, "interact"))
    records = [os.path.join(folder, stage, STAGE_RECORD) for stage in ("stage1", "dpo", "stage2")]
    record = next((read_json(r, "stage record", "") for r in records if os.path.isfile(r)), {})
    trained = record.get("pairs", [])
    # A run launched on several processes trained at a global batch of batch_size x processes:
    # the arms trained here (one process) take that global batch, so their compute is the run's.
    processes = record.get("processes", 1)
    if processes > 1:
        settings = {**settings, "batch_size": settings.get("batch_size", LoRATrainSettings().batch_size) * processes}
    every = {q.id: q for q in read_pairs(os.path.join(folder, "interact"), kept_only=False)}
    pairs = [every[i] for i in trained]  # the pairs round 1 trained on, in its order
    chosen = []
    if pairs:
        cache = load_cache(os.path.join(folder, "cache"), trained)
        equal = sft_steps(settings)
        trainings = [("sft", cache, {"mode": "sft", "steps_stage2": equal})]
        if mode == "dpo":
            half = equal // 2
            trainings.append(("batched", cache, {"mode": "batched", "steps_stage1": equal - half, "steps_stage2": half}))
            for beta in filter(None, args.dpo_betas.split(",")):
                trainings.append((f"dpo-b{float(beta):g}", cache, {"dpo_beta": float(beta)}))
            for weight in filter(None, args.dpo_sft_weights.split(",")):
                trainings.append((f"dpo-w{float(weight):g}", cache, {"dpo_sft_weight": float(weight)}))
            if args.scored_arm and recipe.filter.keep == "enhanced":
                ids = {q.id for q in kept}
                scored = [i for i, q in enumerate(pairs) if q.id in ids]
                if scored:
                    trainings.append(("dpo-scored", cache.subset(scored), {}))
        for name, change in args.arms:
            trainings.append((name, cache, change))
        if args.per_pair:
            chosen = sorted(range(len(pairs)), key=lambda i: -(pairs[i].gain or 0))[:args.per_pair_pairs]
            trainings.append(("per-pair", cache.subset(sorted(chosen)), {"mode": "per-pair", "batch_size": 1}))
        for name, sub, change in trainings:
            lora = train_round_lora(pipe.dit, sub, LoRATrainSettings(**{**settings, **change}), os.path.join(out, name),
                                    progress=False)
            arms.append(Arm(name, [(lora.path, 1.0)]))
    return recipe, summary, arms, pipe, len(chosen), run_seconds


def suggestion_counts(out: str, rounds: list[dict]) -> list[dict]:
    """Per round: the critic's suggestions, and how many had a usable local prompt (not the global
    prompt: the regional blend of the others is an identity, so the loop dropped them)."""
    from artaug_ext.files import read_jsonl
    from artaug_ext.recipe.layout import round_dir

    rows = []
    for r in rounds:
        records = read_jsonl(os.path.join(round_dir(os.path.join(out, "run"), r["round"]), "interact", "manifest.jsonl"),
                             what="manifest")
        usable = sum(len(x.get("suggestions", ())) for x in records)
        made = usable + sum(x.get("identity_suggestions", 0) for x in records)
        rows.append({"round": r["round"], "suggestions": made, "usable": usable,
                     "usable_share": usable / made if made else None})
    return rows


def control_arms(out: str, cfg, pipe) -> dict:
    """The arms without training, from the base's held-out images (already in OUT/eval): tone, cells
    and oracle, written into OUT/control beside a copy of the base, then scored like the eval."""
    from artaug_ext.eval.layout import image_path
    from artaug_ext.eval.run import Arm, EvalConfig, item_seed, run_eval
    from artaug_ext.files import atomic_write_bytes
    from artaug_ext.interact.critics import make_critic
    from artaug_ext.interact.enhance import enhance
    from artaug_ext.interact.images import load_image, png_bytes
    from artaug_ext.interact.parse import split_identities
    from artaug_ext.pipeline import default_size, default_steps, t5_sequence_length

    ctrl_dir = os.path.join(out, "control")
    ctrl = EvalConfig(model=cfg.model, arms=[Arm("base"), Arm("tone"), Arm("cells"), Arm("oracle")], prompts=cfg.prompts,
                      seeds=cfg.seeds, seed=cfg.seed, steps=cfg.steps, width=cfg.width, height=cfg.height,
                      scorer=cfg.scorer, n_boot=cfg.n_boot, selection_scorer=cfg.selection_scorer)
    critic = make_critic("heuristic")
    size = cfg.width or default_size(cfg.model)
    enhanced = 0
    for p, item in enumerate(cfg.prompts):
        for k in range(cfg.seeds):
            base = load_image(image_path(os.path.join(out, "eval"), "base", p, k))
            usable, _ = split_identities(critic.critique(base, item.prompt).suggestions, item.prompt)

            def oracle(usable=usable, p=p, k=k, prompt=item.prompt, base=base):
                if not usable:
                    return base  # nothing to blend in: the base image itself
                return enhance(pipe, prompt, usable, seed=item_seed(cfg, p, k), steps=cfg.steps or default_steps(cfg.model),
                               height=size, width=size, t5_sequence_length=t5_sequence_length(cfg.model),
                               embedded_guidance=cfg.guidance)

            makers = {"base": lambda base=base: base, "tone": lambda base=base: tone_correct(base),
                      "cells": lambda base=base, usable=usable: tone_correct_cells(base, [s.box for s in usable]),
                      "oracle": oracle}
            enhanced += bool(usable)
            for arm, make in makers.items():
                dst = image_path(ctrl_dir, arm, p, k)
                if not os.path.isfile(dst):
                    atomic_write_bytes(dst, png_bytes(make()))
    result = run_eval(ctrl, ctrl_dir, pipe=pipe, progress=False)
    result["oracle_enhanced_images"] = enhanced
    return result


def arm_rows(comparisons: dict) -> list[dict]:
    """Per arm, the headline metrics: means (base -> arm), mean difference, win rate with its
    interval, by category, and whether the row is the filter's own score."""
    rows = []
    for arm, metrics in comparisons.items():
        row = {"arm": arm}
        for name in HEADLINE:
            m = metrics.get(name)
            if m is None or "skipped" in m:
                row[name] = {"skipped": (m or {}).get("skipped", "not scored")}
                continue
            row[name] = {"base": m["mean_b"], "arm": m["mean_a"], "diff": m["mean_diff"], "win": m["win_rate"],
                         "win_ci": m["win_ci"], "selection": bool(m.get("selection")),
                         "by_category": {c: {"n": v["n"], "base": v["mean_b"], "arm": v["mean_a"], "win": v["win_rate"]}
                                         for c, v in m.get("by_category", {}).items()}}
        rows.append(row)
    return rows


def target(rows: list[dict], mode: str = "batched") -> dict:
    """The target, per arm of the run (`{mode}-{round}`): Delta E win interval above 50%, at least
    half the oracle's mean Delta E gain on the same images, lighting accuracy at most 2 points
    down, and (round 1) a mean Delta E no higher than sft's at equal compute."""
    by = {r["arm"]: r for r in rows}
    oracle = by.get("oracle", {}).get("fidelity_delta_e", {})
    out = {}
    for name, r in by.items():
        if not name.startswith(f"{mode}-") or not name[len(mode) + 1:].isdigit() or "win" not in r["fidelity_delta_e"]:
            continue
        de, light = r["fidelity_delta_e"], r["fidelity_lighting"]
        checks = {"delta_e_win_above_50": de["win_ci"][0] > 0.5,
                  "lighting_within_2_points": "base" in light and 100 * (light["base"] - light["arm"]) <= 2}
        if "arm" in oracle:
            checks["half_the_oracle_gain"] = de["base"] - de["arm"] >= 0.5 * (oracle["base"] - oracle["arm"])
        sft = by.get("sft", {}).get("fidelity_delta_e", {})
        if name == f"{mode}-1" and "arm" in sft:
            checks["not_worse_than_sft"] = de["arm"] <= sft["arm"]
        out[name] = {**checks, "met": all(checks.values())}
    return out


def _cell(m: dict, pct: bool = False) -> str:
    if "skipped" in m:
        return "n/a"
    lo, hi = m["win_ci"]
    value = f"{m['base']:.1%}->{m['arm']:.1%}" if pct else f"{m['base']:.2f}->{m['arm']:.2f}"
    return f"{value} win {m['win']:.0%} [{lo:.0%},{hi:.0%}]"


def print_figures(figures: dict, path: str) -> None:
    held = figures["held_out"]
    led = figures["ledger"]
    print(f"held-out: {held['set']} ({held['prompts']} prompts x {held['seeds']} seeds from {EVAL_SEED}), split "
          f"{held['split'].upper()}; {led['dev_configs_before']} configuration(s) run on dev before this one"
          + (f"; test measured {led['test_runs_before']} time(s) before" if held["split"] == "test" else ""))
    res = figures["settings"]["resolution"]
    print(f"trained on {figures['training_prompts']} prompts (1-3 objects), {len(figures['rounds'])} round(s), "
          f"LoRAs at {f'{res} px' if res else 'the generation resolution'}; sft {figures['settings']['sft_steps']} steps")
    for r, s in zip(figures["rounds"], figures["suggestions"], strict=True):
        share = "" if s["usable_share"] is None else f" ({s['usable_share']:.0%})"
        print(f"  round {r['round']}: {r['kept']} of {r['items']} kept, mean gain {r['mean_gain']:.4f}; "
              f"{s['usable']} of {s['suggestions']} suggestions had a usable local prompt{share}")
    print(f"{'arm':<10}{'Delta E (lower better)':<36}{'RGB error (lower better)':<36}{'lighting accuracy':<36}"
          f"{'alignment':<36}quality (selection score: not independent)")
    for r in figures["arms"]:
        print(f"{r['arm']:<10}{_cell(r['fidelity_delta_e']):<36}{_cell(r['fidelity_rgb']):<36}"
              f"{_cell(r['fidelity_lighting'], True):<36}{_cell(r['match'], True):<36}{_cell(r['quality'])}")
    print("by category (Delta E, base -> arm, win rate):")
    for r in figures["arms"]:
        cats = r["fidelity_delta_e"].get("by_category", {})
        print(f"  {r['arm']:<10}" + "  ".join(f"{c}: {v['base']:.1f}->{v['arm']:.1f} {v['win']:.0%}"
                                              for c, v in sorted(cats.items())))
    for name, t in figures["target"].items():
        print(f"target {name}: {'met' if t['met'] else 'missed'} "
              f"({', '.join(k for k, v in t.items() if k != 'met' and not v) or 'every check passed'})")
    print(f"figures: {path}  ({figures['seconds']['total']:.0f} s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("ARTAUG_THREADS", "2")))
    from artaug_ext.eval.prompts import read_prompt_set
    from artaug_ext.eval.run import EvalConfig, run_eval
    from artaug_ext.files import append_line

    out = os.path.abspath(args.out)
    heldout = f"tiny-heldout-{args.heldout}/{args.split}:{args.eval_prompts}"
    prompts = read_prompt_set(heldout)  # a count beyond the part: a one-line error before any training
    ledger = args.ledger or os.path.join(os.path.dirname(out), "bench_method_ledger.jsonl")
    config = configuration(args)
    counts = ledger_counts(ledger, config)
    counts["dev_configs_before"] += args.prior_dev_configs
    if args.split == "test" and not counts["config_run_on_dev"]:
        print("note: this configuration was never run on dev (per the ledger): choose settings on dev first",
              file=sys.stderr)
    t0 = time.perf_counter()
    settings = train_settings(args)
    recipe, summary, arms, pipe, n_pairs, t_run = train_arms(args, out, settings)
    t_train = time.perf_counter() - t0
    trained = set(recipe.prompts())
    assert not trained & {it.prompt for it in prompts}, "a held-out prompt was trained on"
    cfg = EvalConfig(model=args.model, arms=arms, prompts=prompts, seeds=args.eval_seeds, seed=EVAL_SEED,
                     steps=args.gen_steps, width=args.size, height=args.size, scorer=SCORER, n_boot=2000,
                     selection_scorer=SELECTION)
    result = run_eval(cfg, os.path.join(out, "eval"), pipe=pipe, progress=False)
    t_eval = time.perf_counter() - t0 - t_train
    control = control_arms(out, cfg, pipe)
    rows = arm_rows({**result["comparisons"], **control["comparisons"]})
    figures = {"rounds": summary["rounds"], "suggestions": suggestion_counts(out, summary["rounds"]), "arms": rows,
               "target": target(rows, recipe.train.mode),
               "held_out": {"set": heldout, "split": args.split, "prompts": len(prompts), "seeds": args.eval_seeds},
               "ledger": {"path": ledger, **counts, "prior_dev_configs": args.prior_dev_configs},
               "configuration": config, "training_prompts": len(trained), "per_pair_pairs": n_pairs,
               "oracle_enhanced_images": control["oracle_enhanced_images"], "quick": args.quick,
               "selection_scorer": SELECTION, "scorer": SCORER,
               "settings": {"mode": recipe.train.mode, "keep": recipe.filter.keep,
                            "steps_per_stage": recipe.train.steps_stage2, "sft_steps": sft_steps(settings),
                            "lr": recipe.train.lr, "rank": recipe.train.rank, "batch_size": recipe.train.batch_size,
                            "resolution": recipe.train.resolution,
                            **({"dpo_beta": recipe.train.dpo_beta} if recipe.train.mode == "dpo" else {})},
               "seconds": {"run": round(t_run, 1), "sft_and_per_pair": round(t_train - t_run, 1),
                           "eval": round(t_eval, 1), "total": round(time.perf_counter() - t0, 1)}}
    path = args.json or os.path.join(out, "method.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)
    append_line(ledger, {"split": args.split, "config": config, "out": out, "figures": path})
    print_figures(figures, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
