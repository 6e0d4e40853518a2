"""The run folder of `artaug run`: where each file lives and what a round records.

Torch-free, so the CLI, the eval and the run report read a run folder without loading models.

    recipe.toml, run.json          the recipe as given and as resolved (a resume must match)
    rounds/round-01/interact/      the pair dataset (`artaug interact`'s run folder)
    rounds/round-01/cache/         the latent cache
    rounds/round-01/stage1/ stage2/   checkpoints, loss.jsonl, lora.safetensors (or pair-*/)
    rounds/round-01/stage2/samples/   the stage's sample images and samples.json (train.sample_every)
    rounds/round-01/lora.safetensors, train.json, round.json   (round.json last: the round is done)
    final/lora.safetensors         kohya format (DiffSynth, ComfyUI, diffusers)
    final/lora_diffsynth.safetensors   our training format
    final/model_card.json          base model hashes, rounds, counts, scores, the whole recipe
    final/eval/                    the held-out check (an `artaug eval` folder)
    report.html, summary.json      written at the end of every run
    .artaug-run-lock               held by the run's main process (its pid inside) while it runs
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass, field

from ..files import read_json
from ..train.loss_log import LOSS_LOG, read_loss_log
from ..train.samples import SAMPLES_DIR, SAMPLES_FILE, read_samples

RUN_JSON = "run.json"
ROUND_DONE = "round.json"
FINAL_LORA = os.path.join("final", "lora.safetensors")
FINAL_LORA_DIFFSYNTH = os.path.join("final", "lora_diffsynth.safetensors")
MODEL_CARD = os.path.join("final", "model_card.json")
FINAL_EVAL = os.path.join("final", "eval")
SUMMARY = "summary.json"
RUN_LOCK = ".artaug-run-lock"


@dataclass
class RoundRecord:
    """What a round reports (its round.json): counts of the interaction, the training, the LoRA."""

    round: int
    seed: int
    items: int
    enhanced: int
    kept: int
    kept_fraction: float
    mean_gain: float  # over the kept pairs only (each above the filter's margin)
    trained_pairs: int
    mean_gain_enhanced: float | None = None  # over every enhanced item: what run.stop_mean_gain reads
    suggestions: int = 0  # the critic's, in all
    usable_suggestions: int = 0  # with a local prompt of their own (the others, identities, were dropped)
    lora: str | None = None  # relative to the run folder; None: the round trained nothing
    lora_sha256: str | None = None  # of that file: a resume checks it before merging it
    stopped: str | None = None  # why the run stopped in this round (kept no pairs)
    train: dict = field(default_factory=dict)  # per stage: loss summary
    energy_min: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RoundRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def round_dir(out_dir: str, round_number: int) -> str:
    return os.path.join(out_dir, "rounds", f"round-{round_number:02d}")


def read_round(path: str) -> RoundRecord:
    return RoundRecord.from_dict(read_json(path, "round record", f"delete {path}: the round is then made again"))


def round_records(out_dir: str) -> list[RoundRecord]:
    """The record of every finished round of a run folder, in order."""
    return [read_round(p) for p in sorted(glob.glob(os.path.join(out_dir, "rounds", "round-*", ROUND_DONE)))]


def filter_scorer_of(run_dir: str) -> str | None:
    """The filter scorer a run selected its pairs with (run.json), None without a run.json: an eval
    of the run's LoRAs labels that scorer's rows "selection score: not independent"."""
    path = os.path.join(run_dir, RUN_JSON)
    if not os.path.isfile(path):
        return None
    recipe = read_json(path, "run settings", "pass the run's LoRAs with --lora instead of --run").get("recipe", {})
    return recipe.get("filter", {}).get("scorer")


def cumulative_round_loras(out_dir: str) -> list[tuple[str, list[tuple[str, float]]]]:
    """("round-N", the LoRAs of rounds 1..N at alpha 1) for every finished round with a LoRA:
    what the model was after each round, as eval arms."""
    arms, so_far = [], []
    for rec in round_records(out_dir):
        if rec.lora:
            so_far.append((os.path.join(os.path.abspath(out_dir), rec.lora), 1.0))
            arms.append((f"round-{rec.round}", list(so_far)))
    return arms


def stage_losses(out_dir: str, round_number: int) -> dict[str, list[float]]:
    """Per-step losses of a round's stages (for reports)."""
    folder = round_dir(out_dir, round_number)
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", LOSS_LOG), recursive=True)):
        stage = os.path.dirname(path)
        out[os.path.relpath(stage, folder)] = [x["loss"] for x in read_loss_log(stage)]
    return out


def stage_samples(out_dir: str, round_number: int) -> dict[str, list[dict]]:
    """The sample images of a round's stages ({stage folder relative to the round: its samples,
    each with `path`, the image relative to the run folder}), for reports."""
    folder = round_dir(out_dir, round_number)
    out = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "**", SAMPLES_DIR, SAMPLES_FILE), recursive=True)):
        stage = os.path.dirname(os.path.dirname(path))
        out[os.path.relpath(stage, folder)] = [
            {**r, "path": os.path.relpath(os.path.join(stage, SAMPLES_DIR, r["file"]), out_dir)}
            for r in read_samples(stage)]
    return out
