"""How a model is trained: the one settings type (`TrainSettings`, what every training here is
optimised with, and `LoRATrainSettings`, the recipe's [train] table, which adds how the LoRA is
made), with no torch import, so reading and checking a recipe (and `artaug run --dry-run`) costs
no model code. The training loop's own view (`loop.TrainConfig`) holds one of these."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field

from ..errors import UsageError
from ..files import without_defaults
from ..quant import QUANT_EXTRA

# DiffSynth's default FLUX LoRA targets (its FLUX training examples).
FLUX_LORA_TARGETS = ("a_to_qkv", "b_to_qkv", "ff_a.0", "ff_a.2", "ff_b.0", "ff_b.2", "a_to_out", "b_to_out",
                     "proj_out", "norm.linear", "norm1_a.linear", "norm1_b.linear", "to_qkv_mlp")
TIMESTEP_SAMPLING = ("diffsynth", "logit-normal")
MODES = ("batched", "per-pair", "sft", "dpo")
SINGLE_STAGE_MODES = ("sft", "dpo")  # one stage, `steps_stage2` steps; no LoRA_1
SAMPLE_PROMPTS = 2  # train.sample_prompts left out: this many of the recipe's training prompts
SCHEDULES = ("constant", "cosine", "linear")
WEIGHTINGS = ("diffsynth", "uniform")  # of timestep_sampling "diffsynth"; "logit-normal" is unweighted
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
# accelerate's trackers: the package each needs, and how to install it
TRACKERS = {"tensorboard": ("tensorboard", "pip install 'artaug-ext[tensorboard]'"),
            "wandb": ("wandb", "pip install wandb")}
# The optimisers: the package each needs beyond torch (None: torch's own).
OPTIMIZERS = {"adamw": None, "adamw8bit": "bitsandbytes"}


class SettingError(UsageError):
    """A training setting that cannot be used; `key` names it (a recipe error gives its line)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainSettings:
    """How a model is optimised; the defaults are the recipe's [train] defaults."""

    lr: float = 1e-4
    batch_size: int = 1  # per process and micro-batch
    grad_accum: int = 1
    schedule: str = "constant"  # constant | cosine | linear (after warmup)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or no | bf16 | fp16
    seed: int = 0
    checkpoint_every: int = 50
    log_with: str | None = None  # tensorboard | wandb (accelerate trackers)
    optimizer: str = "adamw"  # adamw (torch's, fused) | adamw8bit (bitsandbytes: 8-bit moments)
    ema_decay: float | None = None  # the trained weights' exponential moving average (None: none)

    # Fields that do not change what is trained: a resume may change them.
    RUNTIME = ("checkpoint_every", "log_with")
    # Fields in the identity only when they differ from their default (here: their value before
    # they existed), so checkpoints and stages made before them keep their identity.
    IDENTITY_WHEN_SET = {"optimizer": "adamw", "ema_decay": None}

    def identity(self) -> dict:
        """What a checkpoint made with these settings must agree on to be resumed."""
        return without_defaults({k: v for k, v in asdict(self).items() if k not in self.RUNTIME}, self.IDENTITY_WHEN_SET)

    def _refuse(self, key: str, why: str):
        raise SettingError(key, f"train.{key} {getattr(self, key)!r}: {why}")

    def validate(self) -> None:
        """Every value checked before any work, each error naming the key and what is allowed."""
        if not (_number(self.lr) and self.lr > 0):
            self._refuse("lr", "must be a positive number")
        for key in ("batch_size", "grad_accum"):
            if getattr(self, key) <= 0:
                self._refuse(key, "must be positive")
        if self.schedule not in SCHEDULES:
            self._refuse("schedule", f"use one of {', '.join(SCHEDULES)}")
        for key in ("warmup_steps", "checkpoint_every"):
            if getattr(self, key) < 0:
                self._refuse(key, "must be 0 or more")
        if self.max_grad_norm is not None and not (_number(self.max_grad_norm) and self.max_grad_norm >= 0):
            self._refuse("max_grad_norm", "must be positive, or 0 for no clipping (a negative bound flips every "
                                          "gradient: the model would train uphill)")
        if self.mixed_precision not in MIXED_PRECISIONS:
            self._refuse("mixed_precision", f"use one of {', '.join(MIXED_PRECISIONS)}")
        if self.log_with is not None:
            if self.log_with not in TRACKERS:
                self._refuse("log_with", f"use one of {', '.join(TRACKERS)}, or leave it out")
            package, install = TRACKERS[self.log_with]
            if importlib.util.find_spec(package) is None:
                self._refuse("log_with", f"the {package} package is not installed, so nothing would be logged; "
                                         f"{install}, or leave log_with out")
        if self.optimizer not in OPTIMIZERS:
            self._refuse("optimizer", f"use one of {', '.join(OPTIMIZERS)}")
        package = OPTIMIZERS[self.optimizer]
        if package is not None and importlib.util.find_spec(package) is None:
            self._refuse("optimizer", f"needs the {package} package, which is not installed; install the quant extra "
                                      f"({QUANT_EXTRA}), or use adamw")
        if self.ema_decay is not None and not (_number(self.ema_decay) and 0 < self.ema_decay < 1):
            self._refuse("ema_decay", "must be between 0 and 1 (exclusive; e.g. 0.99), or left out for no EMA")


@dataclass
class LoRATrainSettings(TrainSettings):
    """How a round's LoRA is trained (the recipe's [train] table): the optimisation, and how
    the LoRA is made (its size, the images, the flow-matching objective)."""

    mode: str = "batched"
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    target_modules: list[str] = field(default_factory=lambda: list(FLUX_LORA_TARGETS))
    steps_stage1: int = 100
    steps_stage2: int = 100
    # Longer side of the training images (None: as generated). Bucketed rounds (prompts with sizes):
    # each pair at its bucket under resolution**2 pixels (`buckets.training_bucket`; square: the same).
    resolution: int | None = None
    gradient_checkpointing: bool = False
    timestep_sampling: str = "diffsynth"
    weighting: str = "diffsynth"
    guidance: float = 3.5
    per_pair_rank: int | None = None  # per-pair: rank of the averaged LoRA (None: `rank`; >= pairs x rank: exact)
    # dpo: Flow-DPO's beta (Wallace et al. 2023, for flow matching): how far the LoRA may move from
    # the running base (the reference) to rank each pair's enhanced image above its original.
    dpo_beta: float = 500.0
    # dpo: weight of the enhanced images' own flow-matching loss added to the DPO loss (0: pure
    # DPO). DPO ranks the two images but lets both errors rise (measured on the tiny model);
    # this term holds the preferred image's error down, as SFT on the preferred side does.
    dpo_sft_weight: float = 0.0
    # Images of the LoRA in training, to watch a stage learn: every `sample_every` steps of each
    # stage and at its last step, one image per sample prompt, each from `sample_seed` (0: none).
    # The prompts and seed are fixed, so the images of every stage and round are comparable;
    # left out, the prompts are the first SAMPLE_PROMPTS of the recipe's training prompts.
    sample_every: int = 0
    sample_prompts: list[str] | None = None
    sample_seed: int = 0

    RUNTIME = (*TrainSettings.RUNTIME, "gradient_checkpointing")  # the same gradients, less memory
    # Fields that shape the round, not one stage: the mode and the step counts choose which stages
    # run (a stage's own step count is its TrainConfig.steps, and LoRA_1 is in stage 2's base),
    # per_pair_rank only how the LoRA_2s are combined after training.
    ROUND = ("mode", "steps_stage1", "steps_stage2", "per_pair_rank")
    DPO = ("dpo_beta", "dpo_sft_weight")  # of mode dpo only: in the identity of a DPO stage alone
    # The sample images: they do not change the LoRA, but a stage's samples/ folder is made with
    # them, so a stage that samples is resumed only with the same ones (one that does not keeps
    # the identity it had before these keys existed).
    SAMPLES = ("sample_every", "sample_prompts", "sample_seed")

    def identity(self) -> dict:
        """What a stage trained with these settings must agree on to be reused or resumed. The
        DPO stage adds its objective and beta, a stage that makes sample images their settings
        (the other identities are as before)."""
        own = {k: v for k, v in super().identity().items() if k not in (*self.ROUND, *self.DPO, *self.SAMPLES)}
        if self.mode == "dpo":
            own.update(objective="dpo", dpo_beta=self.dpo_beta)
            if self.dpo_sft_weight:  # in the identity when used: a stage without it keeps its identity
                own["dpo_sft_weight"] = self.dpo_sft_weight
        if self.sample_every:
            own.update({k: getattr(self, k) for k in self.SAMPLES})
        return own

    def validate(self) -> None:
        if self.mode not in MODES:
            self._refuse("mode", f"use one of {', '.join(MODES)}")
        super().validate()
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            self._refuse("timestep_sampling", f"use {', '.join(TIMESTEP_SAMPLING)}")
        if self.weighting not in WEIGHTINGS:
            self._refuse("weighting", f"use one of {', '.join(WEIGHTINGS)}")
        if self.timestep_sampling == "logit-normal" and self.weighting != "diffsynth":
            self._refuse("weighting", "timestep_sampling 'logit-normal' is unweighted and ignores it; leave "
                                      "weighting out, or use timestep_sampling 'diffsynth'")
        for key in ("rank", "steps_stage2"):
            if getattr(self, key) <= 0:
                self._refuse(key, "must be positive")
        if self.mode not in SINGLE_STAGE_MODES and self.steps_stage1 <= 0:
            self._refuse("steps_stage1", f"must be positive in mode {self.mode!r}")
        if self.alpha is not None and not (_number(self.alpha) and self.alpha > 0):
            self._refuse("alpha", "must be positive (or left out: alpha = rank)")
        if self.per_pair_rank is not None and self.per_pair_rank <= 0:
            self._refuse("per_pair_rank", "must be positive (or left out: the rank)")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 16):
            self._refuse("resolution", "must be a positive multiple of 16 (or left out: the generated size)")
        if not self.target_modules:
            self._refuse("target_modules", f"name at least one layer, e.g. {', '.join(FLUX_LORA_TARGETS[:3])}")
        if not (_number(self.dpo_beta) and self.dpo_beta > 0):
            self._refuse("dpo_beta", "must be a positive number (Diffusion-DPO uses hundreds to thousands)")
        if not (_number(self.dpo_sft_weight) and self.dpo_sft_weight >= 0):
            self._refuse("dpo_sft_weight", "must be 0 (pure DPO) or a positive weight")
        if not _number(self.guidance):
            self._refuse("guidance", "must be a finite number")
        self._validate_samples()

    def _validate_samples(self) -> None:
        if self.sample_every < 0:
            self._refuse("sample_every", "must be 0 (no sample images) or a positive number of steps")
        if self.sample_prompts is not None:
            if not self.sample_every:
                self._refuse("sample_prompts", "is set but train.sample_every is 0, so no image would be made; set "
                                               "sample_every, or leave sample_prompts out")
            if not self.sample_prompts:
                self._refuse("sample_prompts", "is an empty list; give at least one prompt, or leave it out (the "
                                               f"first {SAMPLE_PROMPTS} training prompts)")
            blank = next((i for i, p in enumerate(self.sample_prompts) if not (isinstance(p, str) and p.strip())), None)
            if blank is not None:
                self._refuse("sample_prompts", f"prompt {blank + 1} is empty (or not text); write a prompt there or "
                                               "remove it")
        if not 0 <= self.sample_seed < 2 ** 63:
            self._refuse("sample_seed", "must be 0 or more and below 2**63")
