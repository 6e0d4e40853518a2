"""`artaug run`: the ArtAug loop as rounds, from prompts to a combined LoRA.

Round r: generate -> critique -> enhance -> filter (the interaction loop, on the base with
rounds 1..r-1 merged) -> latent cache -> stage 1 -> merge -> stage 2 -> unmerge -> the
round's LoRA, merged into the running base for round r+1. The run stops after `rounds`,
or earlier when a round keeps too small a share of its items or its kept pairs gain too
little (and says which). The final model is the exact sum of the round LoRAs, truncated to
`final_rank` with the retained energy reported, exported into `final/`.

A run folder:

    recipe.toml, run.json          the recipe as given and as resolved (a resume must match)
    rounds/round-01/interact/      the pair dataset (`artaug interact`'s run folder)
    rounds/round-01/cache/         the latent cache
    rounds/round-01/stage1/ stage2/   checkpoints, loss.jsonl, lora.safetensors (or pair-*/)
    rounds/round-01/lora.safetensors, train.json, round.json   (round.json last: the round is done)
    final/lora.safetensors         kohya format (DiffSynth, ComfyUI, diffusers)
    final/lora_diffsynth.safetensors   our training format
    final/model_card.json          base model hashes, rounds, counts, scores, the whole recipe

Every stage writes atomically and leaves a marker when done, so a run killed anywhere
resumes at the stage and item where it stopped. Under `accelerate launch` or torchrun,
generation and caching are sharded by rank and training is DDP; the main process alone
writes the shared files.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time

import torch

from ..errors import UsageError
from ..files import FolderLock, atomic_write_json, recorded_difference
from .config import Recipe

logger = logging.getLogger(__name__)

RUN_FORMAT = 1
ROUND_DONE = "round.json"


def round_dir(out_dir: str, r: int) -> str:
    return os.path.join(out_dir, "rounds", f"round-{r:02d}")


def _check_run_json(out_dir: str, recipe: Recipe, main: bool) -> None:
    path = os.path.join(out_dir, "run.json")
    resolved = {"format": RUN_FORMAT, "recipe": recipe.to_dict(), "prompts": recipe.prompts()}
    diff = recorded_difference(path, resolved)
    if diff:
        raise UsageError(f"--out {out_dir} holds a run of another recipe ({diff}); resume with the same recipe "
                         "or use a new --out (nothing there was changed)")
    if main and not os.path.exists(path):
        atomic_write_json(path, resolved, shared=True)
        if recipe.path and os.path.isfile(recipe.path):
            shutil.copyfile(recipe.path, os.path.join(out_dir, "recipe.toml"))


class RecipeRun:
    """One process's part of a run (all of it without torchrun / accelerate launch)."""

    def __init__(self, recipe: Recipe, out_dir: str, *, model_dir: str | None = None, device: str | None = None,
                 progress: bool = True, accelerator=None):
        self.recipe, self.out_dir, self.model_dir, self.progress = recipe, os.path.abspath(out_dir), model_dir, progress
        self.accelerator = accelerator or self._make_accelerator(device)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        self.device = device if device not in (None, "cuda") or self.world == 1 else str(self.accelerator.device)

    def _make_accelerator(self, device: str | None):
        from accelerate import Accelerator

        cpu = device == "cpu" or not torch.cuda.is_available()
        mixed = self.recipe.train.mixed_precision
        if mixed == "auto":
            mixed = "no" if cpu else "bf16"
        return Accelerator(cpu=cpu, mixed_precision="no" if cpu else mixed, log_with=self.recipe.train.log_with,
                           project_dir=self.out_dir)

    # ------------------------------------------------------------------ setup

    def _barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def _setup(self) -> None:
        from ..interact.critics import make_critic
        from ..interact.scorers import make_scorer
        from ..pipeline import load_pipeline

        r = self.recipe
        c = r.critic
        options = {"max_suggestions": c.max_suggestions}
        if c.backend == "openai":
            options.update(base_url=c.base_url, model=c.model, api_key_env=c.api_key_env, convention=c.convention,
                           max_concurrency=c.concurrency)
        elif c.backend == "transformers":
            options.update(path=c.model, convention=c.convention)
            if self.world > 1:
                options["device_map"] = self.device or "cpu"
        self.critic = make_critic(c.backend, **options)
        self.scorer = make_scorer(r.filter.scorer, model_dir=self.model_dir, device=self.device)
        self.pipe = load_pipeline(r.run.model, model_dir=self.model_dir, device=self.device)
        from ..train.lora import check_rank

        try:
            check_rank(self.pipe.dit, r.train.rank, r.train.target_modules)  # before any image is made
        except UsageError as e:
            raise UsageError(f"{r.path}: [train] {e}") from None
        self.round_loras: list[str] = []

    # ------------------------------------------------------------------ one round

    def _round_seed(self, r: int) -> int:
        return self.recipe.run.seed + ((r - 1) * 100_000 if self.recipe.data.shuffle_seed_per_round else 0)

    def _interact(self, r: int, folder: str) -> None:
        from ..interact.dataset import InteractConfig, InteractRun, merge_manifests
        from ..interact.scorers import FilterConfig

        rc = self.recipe
        size = rc.data.size
        width, height = (size, size) if isinstance(size, int) else (tuple(size) if size else (None, None))
        cfg = InteractConfig(
            prompts=rc.prompts(), model=rc.run.model, loras=[(p, 1.0) for p in self.round_loras],
            critic=rc.critic.backend, critic_options={"max_suggestions": rc.critic.max_suggestions},
            scorer=rc.filter.scorer, images_per_prompt=rc.data.images_per_prompt, steps=rc.data.steps,
            height=height, width=width, seed=self._round_seed(r), region_scale=rc.enhance.region_scale,
            guidance=rc.data.guidance, filter=FilterConfig(margin=rc.filter.margin, relative=rc.filter.relative,
                                                           alignment_tolerance=rc.filter.alignment_tolerance))
        InteractRun(cfg, folder, pipe=self.pipe, critic=self.critic, scorer=self.scorer, progress=self.progress).run()
        self._barrier()
        if self.main:
            merge_manifests(folder)
        self._barrier()

    def _select_pairs(self, folder: str) -> tuple[list, dict]:
        """The kept pairs to train on (best `keep_fraction` by gain, at most `max_pairs`) and the round's counts."""
        from ..interact.dataset import read_manifest, read_pairs

        records = read_manifest(os.path.join(folder, "manifest.jsonl"))
        pairs = read_pairs(folder)
        gains = [p.gain for p in pairs if p.gain is not None]
        f = self.recipe.filter
        chosen = sorted(pairs, key=lambda p: (-(p.gain or 0.0), p.id))
        n = max(1, int(round(len(chosen) * f.keep_fraction))) if chosen else 0
        if f.max_pairs is not None:
            n = min(n, f.max_pairs)
        chosen = sorted(chosen[:n], key=lambda p: p.id)
        stats = {"items": len(records), "enhanced": sum(bool(x.get("enhanced")) for x in records), "kept": len(pairs),
                 "kept_fraction": len(pairs) / len(records) if records else 0.0,
                 "mean_gain": sum(gains) / len(gains) if gains else 0.0, "trained_pairs": len(chosen)}
        return chosen, stats

    def _run_round(self, r: int) -> dict:
        from ..lora import load_lora
        from ..pipeline import t5_sequence_length
        from ..train.cache import build_cache, load_cache
        from ..train.differential import train_round_lora

        folder = round_dir(self.out_dir, r)
        t0 = time.perf_counter()
        logger.info("round %d: interaction (generate, critique, enhance, filter)", r)
        self._interact(r, os.path.join(folder, "interact"))
        pairs, stats = self._select_pairs(os.path.join(folder, "interact"))
        stats.update(round=r, seed=self._round_seed(r))
        if not pairs:
            stats.update(stopped=f"round {r} kept no pairs (of {stats['items']} items): nothing to learn from",
                         lora=None, seconds=round(time.perf_counter() - t0, 1))
            return stats
        logger.info("round %d: %d of %d items kept; caching latents of %d pairs", r, stats["kept"], stats["items"],
                    len(pairs))
        cache_dir = os.path.join(folder, "cache")
        build_cache(self.pipe, pairs, cache_dir, t5_sequence_length=t5_sequence_length(self.recipe.run.model),
                    resolution=self.recipe.train.resolution, rank=self.rank, world=self.world, progress=self.progress)
        self._barrier()
        cache = load_cache(cache_dir, [p.id for p in pairs])
        logger.info("round %d: training the %s differential LoRA", r, self.recipe.train.mode)
        lora = train_round_lora(self.pipe.dit, cache, self.recipe.train, folder, accelerator=self.accelerator,
                                progress=self.progress)
        losses = lora.info.get("losses", {})
        stats.update(lora=os.path.relpath(lora.path, self.out_dir), train=_loss_summary(losses),
                     energy_min=lora.info.get("energy_min"), seconds=round(time.perf_counter() - t0, 1))
        load_lora(self.pipe, lora.path)  # the running base of the next round
        self.round_loras.append(lora.path)
        return stats

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        os.makedirs(self.out_dir, exist_ok=True)
        lock = FolderLock(self.out_dir, f".artaug-run-lock-rank{self.rank:05d}-of-{self.world:05d}").acquire()
        try:
            _check_run_json(self.out_dir, self.recipe, self.main)
            self._barrier()
            self._setup()
            return self._rounds_and_final()
        finally:
            lock.release()

    def _rounds_and_final(self) -> dict:
        from ..lora import load_lora

        rc = self.recipe.run
        rounds, stopped = [], None
        for r in range(1, rc.rounds + 1):
            done = os.path.join(round_dir(self.out_dir, r), ROUND_DONE)
            if os.path.isfile(done):
                with open(done, encoding="utf-8") as f:
                    stats = json.load(f)
                if stats.get("lora"):
                    path = os.path.join(self.out_dir, stats["lora"])
                    load_lora(self.pipe, path)
                    self.round_loras.append(path)
                logger.info("round %d: done before (resumed)", r)
            else:
                stats = self._run_round(r)
                if self.main:
                    atomic_write_json(done, stats)
                self._barrier()
            rounds.append(stats)
            stopped = stats.get("stopped") or self._stop_reason(stats)
            if stopped:
                if not stats.get("stopped"):
                    logger.info("stopping after round %d: %s", r, stopped)
                break
        final = self._final(rounds) if self.round_loras else None
        summary = {"out": self.out_dir, "rounds": rounds, "stopped": stopped, "final": final}
        if final and self.recipe.eval is not None:
            summary["eval"] = self._held_out_check()
        if self.main:
            from ..eval.report import write_run_report

            summary["report"] = write_run_report(self.out_dir, summary)
            atomic_write_json(os.path.join(self.out_dir, "summary.json"), summary)
        return summary

    def _held_out_check(self) -> dict:
        """The base against the base + final LoRA on held-out prompts and seeds (the recipe's
        [eval]): prompts that were trained on are removed from the set, seeds start far away."""
        from ..eval.prompts import read_prompt_set
        from ..eval.run import Arm, EvalConfig, format_table, run_eval
        from ..lora import unload_lora

        e = self.recipe.eval
        trained = set(self.recipe.prompts())
        items = [it for it in read_prompt_set(e.prompts) if it.prompt not in trained]
        from ..eval.prompts import sample_prompts

        items = sample_prompts(items, e.limit, self.recipe.run.seed)
        size = e.size or (self.recipe.data.size if isinstance(self.recipe.data.size, int) else None)
        cfg = EvalConfig(model=self.recipe.run.model, prompts=items, seeds=e.seeds, seed=e.seed,
                         steps=e.steps or self.recipe.data.steps, width=size, height=size,
                         guidance=self.recipe.data.guidance, scorer=e.scorer,
                         arms=[Arm("base"), Arm("artaug", [(os.path.join(self.out_dir, "final", "lora.safetensors"), 1.0)])])
        unload_lora(self.pipe)  # every round's LoRA: the pipeline is the base model again, bit for bit
        self.round_loras = []
        folder = os.path.join(self.out_dir, "final", "eval")
        result = run_eval(cfg, folder, pipe=self.pipe, model_dir=self.model_dir, device=self.device,
                          progress=self.progress)
        what = (f"The base model against base + the final LoRA on {len(items)} held-out prompts ({e.prompts}, none "
                f"trained on) x {e.seeds} seeds from {e.seed}, scored by {e.scorer}.")
        return {"what": what, "report": os.path.join("final", "eval", "report.html"),
                "text": what + "\n" + format_table(result) if self.main else "", "result": result}

    def _stop_reason(self, stats: dict) -> str | None:
        rc = self.recipe.run
        if stats["round"] >= rc.rounds:
            return None
        if stats["kept_fraction"] < rc.stop_kept_fraction:
            return (f"round {stats['round']} kept {stats['kept_fraction']:.1%} of its items, below "
                    f"run.stop_kept_fraction {rc.stop_kept_fraction:.1%}")
        if stats["mean_gain"] < rc.stop_mean_gain:
            return (f"round {stats['round']}'s kept pairs gained {stats['mean_gain']:.4g} on average, below "
                    f"run.stop_mean_gain {rc.stop_mean_gain:g}")
        return None

    def _final(self, rounds: list[dict]) -> dict:
        """The exact sum of the round LoRAs, truncated to final_rank, in both formats, with its card."""
        from ..lora import combine_loras, save_kohya
        from ..train.differential import layers_to_training_state
        from ..train.lora import save_lora

        folder = os.path.join(self.out_dir, "final")
        card_path = os.path.join(folder, "model_card.json")
        if os.path.isfile(card_path):
            with open(card_path, encoding="utf-8") as f:
                return json.load(f)["final"]
        layers, info = combine_loras(self.round_loras, rank=self.recipe.run.final_rank)
        final = {"rounds": len(self.round_loras), "rank": self.recipe.run.final_rank,
                 "ranks_before": max(info["ranks_before"].values()),
                 "energy_min": info.get("min_energy", 1.0), "layers": len(layers),
                 "lora": "final/lora.safetensors", "lora_diffsynth": "final/lora_diffsynth.safetensors"}
        if self.main:
            os.makedirs(folder, exist_ok=True)
            meta = {"artaug_rounds": len(self.round_loras), "artaug_base": self.recipe.run.model}
            save_kohya(layers, os.path.join(folder, "lora.safetensors"), metadata=meta, dtype=torch.float32)
            save_lora(layers_to_training_state(layers), os.path.join(folder, "lora_diffsynth.safetensors"), meta)
            atomic_write_json(card_path, self._model_card(rounds, final))
        self._barrier()
        return final

    def _model_card(self, rounds: list[dict], final: dict) -> dict:
        from ..interact.dataset import sha256_path

        paths = getattr(self.pipe, "artaug_model_paths", {}) or {}
        return {
            "artaug_ext": __import__("artaug_ext").__version__,
            "base_model": self.recipe.run.model,
            "base_model_sha256": {role: sha256_path(p) for role, p in sorted(paths.items()) if isinstance(p, str)},
            "rounds": rounds,
            "counts": {"prompts": len(self.recipe.prompts()), "items": sum(r["items"] for r in rounds),
                       "kept": sum(r["kept"] for r in rounds), "trained_pairs": sum(r["trained_pairs"] for r in rounds)},
            "final": final,
            "recipe": self.recipe.to_dict(),
        }


def _loss_summary(losses: dict) -> dict:
    """First and last loss of each stage (per-pair runs: averaged over pairs)."""
    def ends(values):
        return {"first": values[0], "last": values[-1], "steps": len(values)} if values else {}

    if "stage2" in losses:
        return {k: ends(v) for k, v in losses.items()}
    out = {}
    for stage in ("stage1", "stage2"):
        runs = [v[stage] for v in losses.values() if v.get(stage)]
        if runs:
            out[stage] = {"first": sum(r[0] for r in runs) / len(runs), "last": sum(r[-1] for r in runs) / len(runs),
                          "steps": len(runs[0]), "pairs": len(runs)}
    return out


def run_recipe(recipe: Recipe, out_dir: str, **kwargs) -> dict:
    """Run (or resume) a recipe into `out_dir`; returns the summary (rounds, stop reason, final LoRA)."""
    return RecipeRun(recipe, out_dir, **kwargs).run()


def round_records(out_dir: str) -> list[dict]:
    """The round.json of every finished round of a run folder."""
    out = []
    for path in sorted(glob.glob(os.path.join(out_dir, "rounds", "round-*", ROUND_DONE))):
        with open(path, encoding="utf-8") as f:
            out.append(json.load(f))
    return out


def stage_losses(out_dir: str, r: int) -> dict[str, list[float]]:
    """Per-step losses of a round's stages (for reports)."""
    folder = round_dir(out_dir, r)
    from ..train.loop import LOSS_LOG, read_loss_log

    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", LOSS_LOG), recursive=True)):
        stage = os.path.dirname(path)
        out[os.path.relpath(stage, folder)] = [x["loss"] for x in read_loss_log(stage)]
    return out
