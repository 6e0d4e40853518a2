"""What defines a pair dataset's output: `InteractConfig`, item ids, and the run.json record."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..files import record_settings, without_defaults
from ..quant import UNQUANTIZED
from .constants import DEFAULT_REGION_SCALE
from .keep import FilterConfig

RUN_FORMAT = 1
INTERACT_LOCK = ".artaug-lock"  # held by the main process of the run writing the folder (its pid inside)


@dataclass
class InteractConfig:
    """Everything that defines a run's output (device and progress excluded)."""

    prompts: list[str]
    model: str = "tiny"
    loras: list[tuple[str, float]] = field(default_factory=list)
    critic: str = "heuristic"
    critic_options: dict = field(default_factory=dict)
    scorer: str = "heuristic"
    images_per_prompt: int = 1
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    region_scale: float = DEFAULT_REGION_SCALE
    guidance: float = 3.5
    filter: FilterConfig = field(default_factory=FilterConfig)
    pictures: bool = True
    quantize: str | None = None  # a DiffSynth quantisation method for the DiT (load_pipeline's quantize)
    text_encoders: str = "resident"
    # Per prompt, the (width, height) it asks for (None: the run's size), snapped to a bucket under
    # the run's pixel budget (`buckets.bucket_size`); None: no prompt asks for a size.
    sizes: list[tuple[int, int] | None] | None = None


# Settings that came after RUN_FORMAT, at their value before they existed: run.json holds them
# only when they differ, so older folders still resume.
ADDED_SETTINGS = {**UNQUANTIZED, "sizes": None}


def item_id(prompt_index: int, image_index: int) -> str:
    return f"{prompt_index:05d}-{image_index:02d}"


def run_settings(cfg: InteractConfig, model_sha: dict, lora_sha: list[dict], critic, scorer) -> dict:
    """What run.json records: the config as the critic and scorer describe themselves (so equal
    settings spelled differently compare equal), model and LoRA hashes."""
    d = asdict(cfg)
    d["filter"] = cfg.filter.to_dict()
    d.pop("critic_options")
    d["critic"] = critic.describe() if hasattr(critic, "describe") else cfg.critic
    d["scorer"] = scorer.describe() if hasattr(scorer, "describe") else cfg.scorer
    d["loras"] = lora_sha
    d["model_sha256"] = model_sha
    d["format"] = RUN_FORMAT
    return without_defaults(d, ADDED_SETTINGS)


def check_run_json(run_dir: str, settings: dict) -> None:
    record_settings(os.path.join(run_dir, "run.json"), settings,
                    f"--out {run_dir} holds a run with other settings ({{diff}}); resume with the same settings "
                    "or use a new --out")
