"""A quantised frozen base through DiffSynth's own quantisation (`diffsynth.core.quant`).

We add no quantiser: a method is one of DiffSynth's registered names (`torchao_int8_w8a16`,
`bitsandbytes_nf4`, ...), checked here before any model loads (an unknown name, a backend
that is not installed, a method that gradients cannot pass through while training), and handed
to DiffSynth as `ModelConfig(quantize=QuantizeConfig(method=...))`. A quantised weight cannot
take an exact merge, so a quantised model gets its LoRAs through DiffSynth's hot-loading
(`load_pipeline` wraps it for that as it loads; `load_lora` then hot-loads there).

How the text encoders are held is their own setting (`TEXT_ENCODERS`): resident in the
pipeline's dtype (today's), quantised with the same method, or offloaded (kept on the host
and moved to the device a layer at a time by DiffSynth's VRAM management).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging

from .errors import UsageError

logger = logging.getLogger(__name__)

# The extra that brings every backend we test (torchao, bitsandbytes) and the 8-bit optimiser.
QUANT_EXTRA = "pip install -e \".[quant]\" in a checkout, pip install 'artaug-ext[quant]' otherwise"
# Where each DiffSynth backend's package comes from (its import name and how to install it).
BACKEND_PACKAGES = {"torchao": ("torchao", QUANT_EXTRA), "bitsandbytes": ("bitsandbytes", QUANT_EXTRA)}
TEXT_ENCODERS = ("resident", "quantized", "offloaded")
# load_pipeline's settings of a pipeline loaded as before quantisation existed: run records hold
# these settings only when they differ (files.without_defaults), so older folders still resume.
UNQUANTIZED = {"quantize": None, "text_encoders": "resident"}


def quant_methods() -> dict:
    """DiffSynth's registered quantisation methods, every backend module loaded: {name: spec}."""
    from diffsynth.core.quant import QUANT_METHODS, backends

    backends.load_all_backends()
    return dict(QUANT_METHODS)


def check_quantize(method: str, *, training: bool, what: str = "quantize") -> None:
    """Refuse a method that cannot run here, in one line naming `what` (the option or recipe
    key) and the fix: not one of DiffSynth's names, its backend's package missing, or (when
    training) a method DiffSynth's backend declares non-differentiable, since the LoRA's
    gradient must pass through the frozen quantised layers to reach the layers below."""
    if not isinstance(method, str) or not method:
        raise UsageError(f"{what} {method!r}: name one of DiffSynth's quantisation methods, e.g. torchao_int8_w8a16")
    methods = quant_methods()
    if method not in methods:
        raise UsageError(f"{what} {method!r} is not a DiffSynth quantisation method; use one of "
                         f"{', '.join(sorted(methods))}")
    backend = methods[method].backend
    package, install = BACKEND_PACKAGES.get(backend, (backend, f"install the {backend} backend's package"))
    if importlib.util.find_spec(package) is None:
        raise UsageError(f"{what} {method!r} needs the {package} package, which is not installed: {install}")
    config = quantize_config(method, what)
    if training and not config.backend.capabilities().get("is_differentiable", False):
        trainable = sorted(n for n in methods if n.startswith(backend + "_") and _differentiable(n))
        hint = f" (differentiable {backend} methods: {', '.join(trainable)})" if trainable else ""
        raise UsageError(f"{what} {method!r}: DiffSynth's {backend} backend declares it non-differentiable, so a "
                         f"LoRA cannot train on it; use a weight-only method{hint}")


def _differentiable(method: str) -> bool:
    try:
        return bool(quantize_config(method).backend.capabilities().get("is_differentiable", False))
    except (UsageError, ImportError, NameError, ValueError, TypeError, AttributeError):
        return False


def quantize_config(method: str, what: str = "quantize"):
    """DiffSynth's `QuantizeConfig` for a method (the backend's own environment check included)."""
    from diffsynth.core.quant import QuantizeConfig

    printed = io.StringIO()  # DiffSynth prints where each backend's hardware notes are: to the debug log
    try:
        with contextlib.redirect_stdout(printed):
            config = QuantizeConfig(method=method)  # builds the backend: its environment check included
    except (ImportError, NameError) as e:  # a backend whose package is missing fails here
        raise UsageError(f"{what} {method!r}: its backend cannot load ({e}); {QUANT_EXTRA}") from None
    finally:
        for line in printed.getvalue().splitlines():
            logger.debug("diffsynth: %s", line)
    return config


def quantized_method(module) -> str | None:
    """The DiffSynth method a model was quantised with (its `quantize_config`), or None."""
    config = getattr(module, "quantize_config", None)
    return None if config is None else str(config.method)


def check_text_encoders(value: str, quantize: str | None, what: str = "text_encoders",
                        quantize_what: str = "quantize=METHOD") -> None:
    """How the text encoders are held: one of TEXT_ENCODERS, and `quantized` only with a method
    (`what` / `quantize_what` name the option or recipe key in the one-line error)."""
    if value not in TEXT_ENCODERS:
        raise UsageError(f"{what} {value!r}: use one of {', '.join(TEXT_ENCODERS)}")
    if value == "quantized" and not quantize:
        raise UsageError(f"{what} quantized needs {quantize_what}")
