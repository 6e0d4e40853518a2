"""Training: the flow-matching core, the latent cache and differential LoRA.

Reuses DiffSynth's pieces (`FlowMatchScheduler` training timesteps and weights, the
`FlowMatchSFTLoss` target, `model_fn_flux_image`, PEFT injection) but owns the loop,
because DiffSynth's `launch_training_task` trains at batch size 1 with a constant LR and
saves no optimizer or RNG state: a killed run could not resume where it stopped.
"""

from .flow import FlowMatchObjective, FluxDenoiser
from .loop import SampleRandom, TrainConfig, TrainResult, latest_checkpoint, read_loss_log, train
from .lora import FLUX_LORA_TARGETS, inject_lora, lora_state_dict, remove_lora, save_lora

__all__ = [
    "FLUX_LORA_TARGETS", "FlowMatchObjective", "FluxDenoiser", "SampleRandom", "TrainConfig", "TrainResult",
    "inject_lora", "latest_checkpoint", "lora_state_dict", "read_loss_log", "remove_lora", "save_lora", "train",
]
