"""Training: the flow-matching core, the latent cache and differential LoRA.

Reuses DiffSynth's pieces (`FlowMatchScheduler` training timesteps and weights, the
`FlowMatchSFTLoss` target, `model_fn_flux_image`, PEFT injection) but owns the loop,
because DiffSynth's `launch_training_task` trains at batch size 1 with a constant LR and
saves no optimizer or RNG state: a killed run could not resume where it stopped.

The names below load their module on first use, so `artaug_ext.train.settings` (what a
recipe is checked against) imports without torch or DiffSynth.
"""

from ..lazy import lazy_names

# public name -> module that defines it (imported on first access)
_LAZY = {
    "FlowMatchObjective": "flow", "FluxDenoiser": "flow",
    "SampleRandom": "loop", "TrainConfig": "loop", "TrainResult": "loop", "latest_checkpoint": "loop",
    "read_loss_log": "loss_log", "train": "loop",
    "inject_lora": "lora", "lora_state_dict": "lora", "remove_lora": "lora", "save_lora": "lora",
    "FLUX_LORA_TARGETS": "settings", "LoRATrainSettings": "settings", "TrainSettings": "settings",
}

__getattr__, __dir__, __all__ = lazy_names(__name__, _LAZY)
