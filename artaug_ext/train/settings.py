"""How a model is trained: the one settings type (`TrainSettings`, what every training here is
optimised with, and `LoRATrainSettings`, the recipe's [train] table, which adds how the LoRA is
made), with no torch import, so reading and checking a recipe (and `artaug run --dry-run`) costs
no model code. The training loop's own view (`loop.TrainConfig`) holds one of these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import UsageError

# DiffSynth's default FLUX LoRA targets (its FLUX training examples).
FLUX_LORA_TARGETS = ("a_to_qkv", "b_to_qkv", "ff_a.0", "ff_a.2", "ff_b.0", "ff_b.2", "a_to_out", "b_to_out",
                     "proj_out", "norm.linear", "norm1_a.linear", "norm1_b.linear", "to_qkv_mlp")
TIMESTEP_SAMPLING = ("diffsynth", "logit-normal")
MODES = ("batched", "per-pair", "sft")


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

    # Fields that do not change what is trained: a resume may change them.
    RUNTIME = ("checkpoint_every", "log_with")

    def identity(self) -> dict:
        """What a checkpoint made with these settings must agree on to be resumed."""
        return {k: v for k, v in asdict(self).items() if k not in self.RUNTIME}


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
    resolution: int | None = None  # longer side of the training images (None: as generated)
    gradient_checkpointing: bool = False
    timestep_sampling: str = "diffsynth"
    weighting: str = "diffsynth"
    guidance: float = 3.5
    per_pair_rank: int | None = None  # per-pair: rank of the averaged LoRA (None: `rank`; >= pairs x rank: exact)

    RUNTIME = (*TrainSettings.RUNTIME, "gradient_checkpointing")  # the same gradients, less memory

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"train.mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise UsageError(f"train.timestep_sampling {self.timestep_sampling!r}: use {', '.join(TIMESTEP_SAMPLING)}")
        for name in ("rank", "batch_size", "grad_accum", "steps_stage2"):
            if getattr(self, name) <= 0:
                raise UsageError(f"train.{name} must be positive, not {getattr(self, name)}")
        if self.mode != "sft" and self.steps_stage1 <= 0:
            raise UsageError(f"train.steps_stage1 must be positive in mode {self.mode!r}")
        if not self.lr > 0:
            raise UsageError(f"train.lr must be positive, not {self.lr}")
