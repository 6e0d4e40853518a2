"""`artaug run`: the ArtAug loop as rounds, from prompts to a combined LoRA.

Round r: generate -> critique -> enhance -> filter (the interaction loop, on the base with
rounds 1..r-1 merged) -> latent cache -> stage 1 -> merge -> stage 2 -> unmerge -> the
round's LoRA, merged into the running base for round r+1. The run stops after `rounds`,
or earlier when a round keeps too small a share of its items or its kept pairs gain too
little (and says which). The final model is the exact sum of the round LoRAs, truncated to
`final_rank` with the retained energy reported, exported into `final/`.

The run folder's layout is `recipe/layout.py`'s.

Every stage writes atomically and leaves a marker when done, so a run killed anywhere
resumes at the stage and item where it stopped. Under `accelerate launch` or torchrun,
generation and caching are sharded by rank and training is DDP; the main process alone
writes the shared files.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import shutil
import time

import torch

from ..dist import Collective, Launch, lock_folder, process_info
from ..errors import FileFormatError, UsageError
from ..files import atomic_write_json, check_safetensors, read_json, record_settings, sha256_file
from .config import Recipe, section_defaults
from .layout import (
    FINAL_EVAL,
    FINAL_LORA,
    FINAL_LORA_DIFFSYNTH,
    MODEL_CARD,
    ROUND_DONE,
    RUN_JSON,
    RUN_LOCK,
    SUMMARY,
    RoundRecord,
    read_round,
    round_dir,
)

logger = logging.getLogger(__name__)

RUN_FORMAT = 1


def _check_run_json(out_dir: str, recipe: Recipe) -> None:
    """On the main process (it may repair the record): the folder holds a run of this recipe."""
    path = os.path.join(out_dir, RUN_JSON)
    resolved = {"format": RUN_FORMAT, "recipe": recipe.to_dict(), "prompts": recipe.prompts()}
    sizes = recipe.prompt_sizes()
    if sizes is not None:  # recorded only when prompts carry sizes: runs without them keep their record
        resolved["sizes"] = sizes
    problem = _damaged_json(path, "run record")
    if problem and _same_recipe_file(out_dir, recipe):
        logger.warning("%s: %s; the folder's recipe.toml is this recipe: writing it again", path, problem)
        os.remove(path)
    elif problem:
        raise FileFormatError(path, f"{problem} (the record of the recipe this run folder was made with)",
                              f"delete {path}: the next `artaug run` of the recipe that made the folder writes it "
                              "again and resumes")
    record_settings(path, _as_recorded(resolved, path), f"--out {out_dir} holds a run of another recipe ({{diff}}); "
                    "resume with the same recipe, or give a new --out for this one (nothing there was changed)",
                    write=False)
    if not os.path.exists(path):
        atomic_write_json(path, resolved, shared=True)
        if recipe.path and os.path.isfile(recipe.path):
            shutil.copyfile(recipe.path, os.path.join(out_dir, "recipe.toml"))


def _as_recorded(resolved: dict, path: str) -> dict:
    """The run record as a version that did not have some recipe keys yet wrote it: a key the
    folder's record lacks is left out where the recipe holds its default, so a run made before
    a key existed resumes after an upgrade (at any other value the key is a difference)."""
    if not os.path.exists(path):
        return resolved
    recorded = read_json(path, "run record", "").get("recipe", {})
    recipe = {name: dict(table) if isinstance(table, dict) else table for name, table in resolved["recipe"].items()}
    for name, table in recipe.items():
        if not (isinstance(table, dict) and isinstance(recorded.get(name), dict)):
            continue
        defaults = section_defaults(name)
        for key in [k for k in table if k not in recorded[name] and k in defaults and table[k] == defaults[k]]:
            del table[key]
    return {**resolved, "recipe": recipe}


def _damaged_json(path: str, what: str) -> str | None:
    """What is wrong with the JSON record `path` (None: absent, or it parses as an object)."""
    if not os.path.exists(path):
        return None
    try:
        read_json(path, what, "")
    except FileFormatError as e:
        return e.problem
    return None


def _same_recipe_file(out_dir: str, recipe: Recipe) -> bool:
    """Whether the run folder's copy of its recipe is, byte for byte, the recipe file given now."""
    copy = os.path.join(out_dir, "recipe.toml")
    if not (recipe.path and os.path.isfile(recipe.path) and os.path.isfile(copy)):
        return False
    with open(copy, "rb") as a, open(recipe.path, "rb") as b:
        return a.read() == b.read()


def _lora_problem(path: str, sha256: str | None) -> str | None:
    """Why the LoRA file `path` cannot be trusted (None: it is whole, and the file recorded)."""
    if not os.path.isfile(path):
        return "is missing"
    try:
        check_safetensors(path)
    except FileFormatError as e:
        return f"is damaged ({e.problem})"
    if sha256 is not None and sha256_file(path) != sha256:
        return "is not the file that was written (its sha256 differs from the one recorded)"
    return None


class RecipeRun:
    """One process's part of a run (all of it without torchrun / accelerate launch)."""

    def __init__(self, recipe: Recipe, out_dir: str, *, model_dir: str | None = None, device: str | None = None,
                 progress: bool = True, accelerator=None, launch: Launch | None = None):
        self.recipe, self.out_dir, self.model_dir, self.progress = recipe, os.path.abspath(out_dir), model_dir, progress
        # what the command holds for the launch (the folder lock it took before torch, what is going on)
        self.launch = launch or Launch()
        self.accelerator = accelerator or self._make_accelerator(device)
        info = process_info(self.accelerator)
        self.rank, self.world, self.main = info.rank, info.world, info.main
        self.collective = Collective(self.accelerator, info, self.launch)
        self.device = device if device not in (None, "cuda") or self.world == 1 else str(self.accelerator.device)

    def _make_accelerator(self, device: str | None):
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        cpu = device == "cpu" or not torch.cuda.is_available()
        mixed = self.recipe.train.mixed_precision
        if mixed == "auto":
            mixed = "no" if cpu else "bf16"
        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=self.launch.timeout))  # a hung peer: bounded
        return Accelerator(cpu=cpu, mixed_precision="no" if cpu else mixed, log_with=self.recipe.train.log_with,
                           project_dir=self.out_dir, kwargs_handlers=[timeout])

    # ------------------------------------------------------------------ setup

    def _barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def _setup(self) -> None:
        from ..interact.critics import make_critic
        from ..interact.scorers import make_scorer
        from ..pipeline import load_pipeline

        recipe = self.recipe
        critic = recipe.critic
        options = {"max_suggestions": critic.max_suggestions}
        if critic.backend == "openai":
            options.update(base_url=critic.base_url, model=critic.model, api_key_env=critic.api_key_env,
                           convention=critic.convention, max_concurrency=critic.concurrency)
        elif critic.backend == "transformers":
            options.update(path=critic.model, convention=critic.convention)
            if self.world > 1:
                options["device_map"] = self.device or "cpu"
        self.critic = make_critic(critic.backend, **options)
        self.scorer = make_scorer(recipe.filter.scorer, model_dir=self.model_dir, device=self.device)
        self.pipe = load_pipeline(recipe.run.model, model_dir=self.model_dir, device=self.device,
                                  quantize=recipe.run.quantize, text_encoders=recipe.run.text_encoders)
        from ..train.lora import lora_target_layers

        try:
            lora_target_layers(self.pipe.dit, recipe.train.rank, recipe.train.target_modules)  # before any image
        except UsageError as e:
            raise UsageError(f"{recipe.path}: [train] {e}") from None
        self.round_loras: list[str] = []

    # ------------------------------------------------------------------ one round

    def _round_seed(self, round_number: int) -> int:
        return self.recipe.run.seed + ((round_number - 1) * 100_000 if self.recipe.data.shuffle_seed_per_round else 0)

    def _interact(self, round_number: int, folder: str) -> None:
        from ..interact.config import InteractConfig
        from ..interact.keep import FilterConfig
        from ..interact.loop import InteractRun
        from ..interact.manifest import merge_manifests

        recipe = self.recipe
        width, height = self._generation_size()
        keep = recipe.filter
        cfg = InteractConfig(
            prompts=recipe.prompts(), model=recipe.run.model, loras=[(p, 1.0) for p in self.round_loras],
            critic=recipe.critic.backend, critic_options={"max_suggestions": recipe.critic.max_suggestions},
            scorer=keep.scorer, images_per_prompt=recipe.data.images_per_prompt, steps=recipe.data.steps,
            height=height, width=width, seed=self._round_seed(round_number), region_scale=recipe.enhance.region_scale,
            guidance=recipe.data.guidance, filter=FilterConfig(margin=keep.margin, relative=keep.relative,
                                                               alignment_tolerance=keep.alignment_tolerance),
            quantize=recipe.run.quantize, text_encoders=recipe.run.text_encoders, sizes=recipe.prompt_sizes())
        InteractRun(cfg, folder, pipe=self.pipe, critic=self.critic, scorer=self.scorer, progress=self.progress,
                    collective=self.collective).run()
        self._barrier()
        if self.main:
            merge_manifests(folder)
        self._barrier()

    def _generation_size(self) -> tuple[int | None, int | None]:
        """(width, height) of the recipe's images ([data] size; (None, None): the model's default)."""
        size = self.recipe.data.size
        return (size, size) if isinstance(size, int) else (tuple(size) if size else (None, None))

    def _train_settings(self):
        """The [train] settings the stages train with, and the sampler that makes their sample
        images (None: sample_every 0). The sample prompts are resolved here (left out: the first
        SAMPLE_PROMPTS training prompts), so every stage of every round draws the same prompts
        from the same seed, at the recipe's generation settings ([data] size, steps, guidance),
        and each stage's record holds the prompts its images show."""
        from ..train.samples import StageSampler
        from ..train.settings import SAMPLE_PROMPTS

        train, data = self.recipe.train, self.recipe.data
        if not train.sample_every:
            return train, None
        settings = dataclasses.replace(train, sample_prompts=list(train.sample_prompts or
                                                                  self.recipe.prompts()[:SAMPLE_PROMPTS]))
        width, height = self._generation_size()
        return settings, StageSampler(self.pipe, settings.sample_prompts, settings.sample_seed, steps=data.steps,
                                      height=height, width=width, guidance=data.guidance)

    def _select_pairs(self, folder: str, round_number: int) -> tuple[list, RoundRecord]:
        """The kept pairs to train on (best `keep_fraction` by gain, at most `max_pairs`) and the round's counts."""
        from ..interact.manifest import read_manifest
        from ..interact.pairs import read_pairs

        records = read_manifest(os.path.join(folder, "manifest.jsonl"))
        pairs = read_pairs(folder)
        gains = [p.gain for p in pairs if p.gain is not None]
        every = [x["gain"] for x in records if x.get("enhanced") and x.get("gain") is not None]
        keep = self.recipe.filter
        candidates = pairs if keep.keep == "score" else read_pairs(folder, kept_only=False)
        chosen = sorted(candidates, key=lambda p: (-(p.gain or 0.0), p.id))
        n = max(1, int(round(len(chosen) * keep.keep_fraction))) if chosen else 0
        if keep.max_pairs is not None:
            n = min(n, keep.max_pairs)
        chosen = sorted(chosen[:n], key=lambda p: p.id)
        record = RoundRecord(round=round_number, seed=self._round_seed(round_number), items=len(records),
                             enhanced=sum(bool(x.get("enhanced")) for x in records), kept=len(pairs),
                             kept_fraction=len(pairs) / len(records) if records else 0.0,
                             mean_gain=sum(gains) / len(gains) if gains else 0.0, trained_pairs=len(chosen),
                             mean_gain_enhanced=sum(every) / len(every) if every else None,
                             usable_suggestions=sum(len(x.get("suggestions", ())) for x in records),
                             suggestions=sum(len(x.get("suggestions", ())) + x.get("identity_suggestions", 0)
                                             for x in records))
        return chosen, record

    def _run_round(self, round_number: int) -> RoundRecord:
        from ..lora import load_lora
        from ..pipeline import t5_sequence_length
        from ..train.cache import build_cache, load_cache
        from ..train.differential import train_round_lora

        folder = round_dir(self.out_dir, round_number)
        t0 = time.perf_counter()
        logger.info("round %d: interaction (generate, critique, enhance, filter)", round_number)
        self.launch.doing = f"the interaction of round {round_number}"
        self._interact(round_number, os.path.join(folder, "interact"))
        pairs, record = self._select_pairs(os.path.join(folder, "interact"), round_number)
        if not pairs:
            record.stopped = f"round {round_number} kept no pairs (of {record.items} items): nothing to learn from"
            record.seconds = round(time.perf_counter() - t0, 1)
            return record
        logger.info("round %d: %d of %d items kept; caching latents of %d pairs", round_number, record.kept,
                    record.items, len(pairs))
        cache_dir = os.path.join(folder, "cache")
        self.launch.doing = f"the latent cache of round {round_number}"
        build_cache(self.pipe, pairs, cache_dir, t5_sequence_length=t5_sequence_length(self.recipe.run.model),
                    resolution=self.recipe.train.resolution, bucketed=self.recipe.prompt_sizes() is not None,
                    rank=self.rank, world=self.world, progress=self.progress)
        self._barrier()
        cache = load_cache(cache_dir, [p.id for p in pairs])
        logger.info("round %d: training the %s differential LoRA", round_number, self.recipe.train.mode)
        from ..files import sha256_file

        self.launch.doing = f"the training of round {round_number}"
        settings, sampler = self._train_settings()
        try:
            lora = train_round_lora(self.pipe.dit, cache, settings, folder, accelerator=self.accelerator,
                                    progress=self.progress, base_loras=[sha256_file(p) for p in self.round_loras],
                                    sampler=sampler)
        except BaseException:
            self.launch.doing = f"{_current_stage(folder)} of round {round_number}"
            raise
        record.lora = os.path.relpath(lora.path, self.out_dir)
        record.lora_sha256 = sha256_file(lora.path)
        record.train = _loss_summary(lora.info.get("losses", {}), lora.info.get("gaps", {}))
        record.energy_min = lora.info.get("energy_min")
        record.seconds = round(time.perf_counter() - t0, 1)
        load_lora(self.pipe, lora.path, undo=False)  # the running base of the next round: no host copy
        self.round_loras.append(lora.path)
        return record

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        os.makedirs(self.out_dir, exist_ok=True)
        lock = lock_folder(self.out_dir, self.collective, RUN_LOCK)
        try:
            self.collective.check_shared_folder(self.out_dir)
            self.collective.on_main(lambda: _check_run_json(self.out_dir, self.recipe))  # it may repair run.json
            self._barrier()
            self._setup()
            return self._rounds_and_final()
        finally:
            if lock is not None:
                lock.release()

    def _rounds_and_final(self) -> dict:
        from ..lora import load_lora

        rounds, stopped = [], None
        for round_number in range(1, self.recipe.run.rounds + 1):
            done = os.path.join(round_dir(self.out_dir, round_number), ROUND_DONE)
            record, before = self._finished_round(round_number)
            if record is not None:
                if record.lora:
                    path = os.path.join(self.out_dir, record.lora)
                    load_lora(self.pipe, path, undo=False)
                    self.round_loras.append(path)
                logger.info("round %d: done before (resumed)", round_number)
            else:
                record = self._run_round(round_number)
                self._check_rebuilt(round_number, before, record)
                if self.main:
                    atomic_write_json(done, record.to_dict())
                self._barrier()
            rounds.append(record)
            stopped = record.stopped or self._stop_reason(record)
            if stopped:
                if not record.stopped:
                    logger.info("stopping after round %d: %s", round_number, stopped)
                break
        self.launch.doing = "the final LoRA"
        final = self._final(rounds) if self.round_loras else None
        summary = {"out": self.out_dir, "rounds": [rec.to_dict() for rec in rounds], "stopped": stopped, "final": final}
        if final and self.recipe.eval is not None:
            self.launch.doing = "the held-out check"
            summary["eval"] = self._held_out_check()
        if self.main:
            from .report import write_run_report

            summary["report"] = write_run_report(self.out_dir, summary)
            atomic_write_json(os.path.join(self.out_dir, SUMMARY), summary)
        return summary

    def _finished_round(self, round_number: int) -> tuple[RoundRecord | None, RoundRecord | None]:
        """(the record of a finished round whose outputs are whole, None: the round is to be run,
        the record it had). A round record that does not parse, a round LoRA that is missing,
        damaged or not the file written, or a pair manifest that lost items makes the round run
        again (with a warning naming the file): it resumes from its saved stages, so only what
        was lost is made again."""
        from ..interact.manifest import merged_manifest

        folder = round_dir(self.out_dir, round_number)
        done = os.path.join(folder, ROUND_DONE)
        if not os.path.isfile(done):
            return None, None
        problem = _damaged_json(done, "round record")
        if problem:
            logger.warning("%s: %s: round %d is made again from its saved stages", done, problem, round_number)
            return None, None
        record = read_round(done)
        if record.lora:
            path = os.path.join(self.out_dir, record.lora)
            problem = _lora_problem(path, record.lora_sha256)
            if problem:
                logger.warning("%s (round %d's LoRA) %s: round %d is made again from its saved stages", path,
                               round_number, problem, round_number)
                return None, record
        interact = os.path.join(folder, "interact")
        try:
            items = len(merged_manifest(interact))
        except FileFormatError as e:
            logger.warning("%s: round %d is made again", e, round_number)
            return None, record
        if items != record.items:
            logger.warning("%s holds %d items, round %d had %d: the round is made again", os.path.join(interact, "shards"),
                           items, round_number, record.items)
            return None, record
        return record, record

    def _check_rebuilt(self, round_number: int, before: RoundRecord | None, record: RoundRecord) -> None:
        """A round made again must give the LoRA later rounds were trained on top of."""
        later = os.path.join(round_dir(self.out_dir, round_number + 1), ROUND_DONE)
        if (before is None or not before.lora_sha256 or not os.path.isfile(later)
                or record.lora_sha256 == before.lora_sha256):
            return
        raise UsageError(f"{os.path.join(self.out_dir, record.lora)}: round {round_number}'s LoRA, made again, differs "
                         f"from the one rounds {round_number + 1}.. were trained on top of; delete "
                         f"{os.path.join(self.out_dir, 'rounds')}/round-NN for every N > {round_number}, and "
                         f"{os.path.join(self.out_dir, 'final')}, to train them again")

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
                         guidance=self.recipe.data.guidance, scorer=e.scorer, selection_scorer=self.recipe.filter.scorer,
                         arms=[Arm("base"), Arm("artaug", [(os.path.join(self.out_dir, FINAL_LORA), 1.0)])])
        unload_lora(self.pipe)  # every round's LoRA, read back from the model files: the base again, bit for bit
        self.round_loras = []
        folder = os.path.join(self.out_dir, FINAL_EVAL)
        self.collective.on_main(lambda: _drop_other_eval(folder, cfg, self.pipe, self.model_dir))
        result = run_eval(cfg, folder, pipe=self.pipe, model_dir=self.model_dir, device=self.device,
                          progress=self.progress, collective=self.collective)
        what = (f"The base model against base + the final LoRA on {len(items)} held-out prompts ({e.prompts}, none "
                f"trained on) x {e.seeds} seeds from {e.seed}, scored by {e.scorer}.")
        return {"what": what, "report": os.path.join(FINAL_EVAL, "report.html"),
                "text": what + "\n" + format_table(result) if self.main else "", "result": result}

    def _stop_reason(self, record: RoundRecord) -> str | None:
        run = self.recipe.run
        if record.round >= run.rounds:
            return None
        if record.kept_fraction < run.stop_kept_fraction:
            return (f"round {record.round} kept {record.kept_fraction:.1%} of its items, below "
                    f"run.stop_kept_fraction {run.stop_kept_fraction:.1%}")
        if run.stop_mean_gain is not None and (record.mean_gain_enhanced is None
                                               or record.mean_gain_enhanced < run.stop_mean_gain):
            gained = "had no enhanced item" if record.mean_gain_enhanced is None else \
                f"gained {record.mean_gain_enhanced:.4g} on average over its {record.enhanced} enhanced items"
            return f"round {record.round} {gained}, below run.stop_mean_gain {run.stop_mean_gain:g}"
        return None

    def _final(self, rounds: list[RoundRecord]) -> dict:
        """The exact sum of the round LoRAs, truncated to final_rank, in both formats, with its card."""
        from ..lora import combine_loras, save_kohya
        from ..train.differential import layers_to_training_state
        from ..train.lora import save_lora

        card_path = os.path.join(self.out_dir, MODEL_CARD)
        if os.path.isfile(card_path):
            problem = self._final_problem(card_path)
            if problem is None:
                return read_json(card_path, "model card", "")["final"]
            logger.warning("%s: making the final LoRA and its model card again from the round LoRAs", problem)
        layers, info = combine_loras(self.round_loras, rank=self.recipe.run.final_rank)
        final = {"rounds": len(self.round_loras), "rank": self.recipe.run.final_rank,
                 "ranks_before": max(info["ranks_before"].values()),
                 "energy_min": info.get("min_energy", 1.0), "layers": len(layers),
                 "lora": FINAL_LORA, "lora_diffsynth": FINAL_LORA_DIFFSYNTH}
        if self.main:
            os.makedirs(os.path.dirname(os.path.join(self.out_dir, FINAL_LORA)), exist_ok=True)
            meta = {"artaug_rounds": len(self.round_loras), "artaug_base": self.recipe.run.model}
            save_kohya(layers, os.path.join(self.out_dir, FINAL_LORA), metadata=meta, dtype=torch.float32)
            save_lora(layers_to_training_state(layers), os.path.join(self.out_dir, FINAL_LORA_DIFFSYNTH), meta)
            final["sha256"] = {rel: sha256_file(os.path.join(self.out_dir, rel)) for rel in (FINAL_LORA,
                                                                                              FINAL_LORA_DIFFSYNTH)}
            atomic_write_json(card_path, self._model_card(rounds, final))
        self._barrier()
        return final

    def _final_problem(self, card_path: str) -> str | None:
        """Why the finished final/ cannot be trusted (None: its card parses, and both LoRA files are
        whole and the files the card records)."""
        problem = _damaged_json(card_path, "model card")
        if problem:
            return f"{card_path}: {problem}"
        final = read_json(card_path, "model card", "").get("final")
        if not isinstance(final, dict):
            return f"{card_path}: the model card has no final LoRA"
        for rel in (FINAL_LORA, FINAL_LORA_DIFFSYNTH):
            path = os.path.join(self.out_dir, rel)
            problem = _lora_problem(path, (final.get("sha256") or {}).get(rel))
            if problem:
                return f"{path} (the final LoRA) {problem}"
        return None

    def _model_card(self, rounds: list[RoundRecord], final: dict) -> dict:
        from ..files import sha256_path
        from ..hub import hash_cache_file

        paths = getattr(self.pipe, "artaug_model_paths", {}) or {}
        cache = hash_cache_file()
        return {
            "artaug_ext": __import__("artaug_ext").__version__,
            "base_model": self.recipe.run.model,
            "base_model_sha256": {role: sha256_path(p, cache) for role, p in sorted(paths.items()) if isinstance(p, str)},
            "rounds": [rec.to_dict() for rec in rounds],
            "counts": {"prompts": len(self.recipe.prompts()), "items": sum(rec.items for rec in rounds),
                       "kept": sum(rec.kept for rec in rounds),
                       "trained_pairs": sum(rec.trained_pairs for rec in rounds)},
            "final": final,
            "train_guidance": train_guidance_note(self.recipe),
            "recipe": self.recipe.to_dict(),
        }


def _current_stage(round_folder: str) -> str:
    """The training stage a round was in ("stage 2", "stage 1 of pair-00001-00"): the one whose
    stage record was written last (each stage writes it before it trains)."""
    from ..train.differential import STAGE_RECORD

    records = glob.glob(os.path.join(glob.escape(round_folder), "**", STAGE_RECORD), recursive=True)
    if not records:
        return "the training"
    stage = os.path.relpath(os.path.dirname(max(records, key=os.path.getmtime)), round_folder).split(os.sep)
    return " of ".join(part.replace("stage", "stage ") if part.startswith("stage") else part for part in reversed(stage))


def _drop_other_eval(folder: str, cfg, pipe, model_dir: str | None) -> None:
    """The run's held-out check is the run's to make: a final/eval of other settings (an older
    format, or an eval.json that does not parse) is removed, with a warning, and made again."""
    from ..eval.run import folder_difference, folder_record

    diff = folder_difference(folder, folder_record(cfg, getattr(pipe, "artaug_model_paths", {}) or {}, model_dir))
    if diff:
        logger.warning("%s holds another held-out check (%s): making it again", folder, diff)
        shutil.rmtree(folder)


def train_guidance_note(recipe: Recipe) -> dict:
    """The embedded guidance the LoRAs were trained at, and whether it is the model's authors'
    setting or the recipe's own choice (generation uses [data] guidance either way)."""
    from ..cards import card

    d = card(recipe.run.model).defaults
    value = recipe.train.guidance
    if d.train_guidance is None:
        choice = "the recipe's choice (no authors' setting is known for this model)"
    elif value == d.train_guidance:
        choice = f"the authors' setting: {d.train_guidance_source}"
    else:
        choice = f"the recipe's choice, not the authors' {d.train_guidance:g} ({d.train_guidance_source})"
    return {"value": value, "choice": choice, "generation": recipe.data.guidance}


LOSS_WINDOW = 0.1  # the share of a stage's steps averaged at each end


def _ends(values: list[float]) -> dict:
    """Mean loss of the first and of the last 10% of a stage's steps (at least one step each):
    one step's loss under random timesteps is mostly the timestep's noise, not the fit."""
    if not values:
        return {}
    n = max(1, round(len(values) * LOSS_WINDOW))
    return {"first": sum(values[:n]) / n, "last": sum(values[-n:]) / n, "window": n, "steps": len(values)}


def _loss_summary(losses: dict, gaps: dict | None = None) -> dict:
    """Per stage, the loss at the start and the end of training (`_ends`) and its paired gap
    (enhanced minus original error under fixed draws) before and after; per-pair runs: losses
    averaged over pairs."""
    if "stage2" in losses or "dpo" in losses:
        out = {k: _ends(v) for k, v in losses.items()}
        for k, gap in (gaps or {}).items():
            if gap and k in out:
                out[k]["paired_gap"] = {"before": gap["before"]["gap"], "after": gap["after"]["gap"],
                                        "learned": gap["learned"]}
        return out
    out = {}
    for stage in ("stage1", "stage2"):
        runs = [_ends(v[stage]) for v in losses.values() if v.get(stage)]
        if runs:
            out[stage] = {"first": sum(r["first"] for r in runs) / len(runs),
                          "last": sum(r["last"] for r in runs) / len(runs),
                          "window": runs[0]["window"], "steps": runs[0]["steps"], "pairs": len(runs)}
    return out


def run_recipe(recipe: Recipe, out_dir: str, **kwargs) -> dict:
    """Run (or resume) a recipe into `out_dir`; returns the summary (rounds, stop reason, final LoRA)."""
    return RecipeRun(recipe, out_dir, **kwargs).run()
