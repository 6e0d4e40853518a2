"""Training: the flow-matching core, the latent cache and differential LoRA.

Reuses DiffSynth's pieces (`FlowMatchScheduler` training timesteps and weights, the
`FlowMatchSFTLoss` target, `model_fn_flux_image`, PEFT injection) but owns the loop,
because DiffSynth's `launch_training_task` trains at batch size 1 with a constant LR and
saves no optimizer or RNG state: a killed run could not resume where it stopped.

The names below load their module on first use, so `artaug_ext.train.settings` (what a
recipe is checked against) imports without torch or DiffSynth.
"""

import importlib

# public name -> module that defines it (imported on first access)
_LAZY = {
    "FlowMatchObjective": "flow", "FluxDenoiser": "flow",
    "SampleRandom": "loop", "TrainConfig": "loop", "TrainResult": "loop", "latest_checkpoint": "loop",
    "read_loss_log": "loop", "train": "loop",
    "inject_lora": "lora", "lora_state_dict": "lora", "remove_lora": "lora", "save_lora": "lora",
    "FLUX_LORA_TARGETS": "settings", "LoRATrainSettings": "settings",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
