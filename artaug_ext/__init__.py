"""artaug-ext: ArtAug (arXiv 2412.12888) for DiffSynth-Studio FLUX, with fused Triton kernels."""

import logging

from .registry import register

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

register()

from .pipeline import generate, load_pipeline  # noqa: E402

__all__ = ["register", "load_pipeline", "generate", "__version__"]
