"""artaug-ext: ArtAug (arXiv 2412.12888) for DiffSynth-Studio FLUX, with fused Triton kernels.

`import artaug_ext` is cheap: it imports neither torch nor DiffSynth. The public API below
loads its module on first use, and our models are registered into DiffSynth's registry when
DiffSynth imports it (see `artaug_ext.diffsynth_hook`).
"""

import logging

from . import diffsynth_hook
from .errors import ArtaugError, FileFormatError, NonFiniteError, UsageError  # noqa: F401  (public)
from .lazy import lazy_names

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
diffsynth_hook.install()

# public name -> module that defines it (imported on first access)
_LAZY = {
    "register": "registry",
    "load_pipeline": "pipeline", "generate": "pipeline",
    "load_lora": "lora", "unload_lora": "lora", "load_artaug": "lora", "combine_loras": "lora",
    "save_kohya": "lora", "LoRAReport": "lora", "LoRAFormatError": "lora",
    "apply_kernels": "patch", "remove_kernels": "patch", "kernel_stats": "patch", "reset_kernel_stats": "patch",
    "KernelPatchError": "patch",
}

__getattr__, __dir__, __all__ = lazy_names(
    __name__, _LAZY, eager=("ArtaugError", "FileFormatError", "NonFiniteError", "UsageError", "__version__"))
