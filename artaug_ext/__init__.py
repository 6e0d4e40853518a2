"""artaug-ext: ArtAug (arXiv 2412.12888) for DiffSynth-Studio FLUX, with fused Triton kernels."""

import logging

from .registry import register

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

register()

from .lora import (  # noqa: E402
    LoRAFormatError,
    LoRAReport,
    combine_loras,
    load_artaug,
    load_lora,
    save_kohya,
    unload_lora,
)
from .patch import KernelPatchError, apply_kernels, kernel_stats, remove_kernels, reset_kernel_stats  # noqa: E402
from .pipeline import generate, load_pipeline  # noqa: E402

__all__ = [
    "register", "load_pipeline", "generate", "load_lora", "unload_lora", "load_artaug", "combine_loras",
    "save_kohya", "LoRAReport", "LoRAFormatError", "apply_kernels", "remove_kernels", "kernel_stats",
    "reset_kernel_stats", "KernelPatchError", "__version__",
]
