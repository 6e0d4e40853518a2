"""Flow-matching training core (full or LoRA) on `accelerate`.

Reuses DiffSynth's pieces (`FlowMatchScheduler` training timesteps and weights, the
`FlowMatchSFTLoss` target, `model_fn_flux_image`, PEFT injection) but owns the loop,
because DiffSynth's `launch_training_task` trains at batch size 1 with a constant LR and
saves no optimizer or RNG state: a killed run could not resume where it stopped.
"""

from .flow import FlowMatchObjective, FluxDenoiser
from .loop import TrainConfig, TrainResult, latest_checkpoint, train
from .lora import FLUX_LORA_TARGETS, inject_lora, lora_state_dict

__all__ = [
    "FLUX_LORA_TARGETS", "FlowMatchObjective", "FluxDenoiser", "TrainConfig", "TrainResult",
    "inject_lora", "latest_checkpoint", "lora_state_dict", "train",
]
