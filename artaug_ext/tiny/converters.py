"""State-dict converters named in our DiffSynth registry entries.

The tiny files use FLUX.1-dev's key formats, so these delegate to DiffSynth's own
converters; they exist so the registry entries point into this package (DiffSynth
imports them by dotted name) and so a file that is not fully consumed is an error
rather than a silently half-loaded model.
"""

from diffsynth.utils.state_dict_converters.flux_dit import FluxDiTStateDictConverter
from diffsynth.utils.state_dict_converters.flux_text_encoder_clip import FluxTextEncoderClipStateDictConverter
from diffsynth.utils.state_dict_converters.flux_text_encoder_t5 import FluxTextEncoderT5StateDictConverter
from diffsynth.utils.state_dict_converters.flux_vae import (
    FluxVAEDecoderStateDictConverter,
    FluxVAEEncoderStateDictConverter,
)


def _checked(converter, state_dict, what, expected_prefix=None):
    keys = [k for k in state_dict if expected_prefix is None or k.startswith(expected_prefix)]
    out = converter(state_dict)
    if len(out) < len(keys):
        raise ValueError(f"{what}: {len(keys) - len(out)} of {len(keys)} tensors in the file map to no module")
    return out


def tiny_dit_converter(state_dict):
    return _checked(FluxDiTStateDictConverter, state_dict, "tiny DiT")


def tiny_clip_converter(state_dict):
    return _checked(FluxTextEncoderClipStateDictConverter, state_dict, "tiny CLIP text encoder")


def tiny_t5_converter(state_dict):
    return FluxTextEncoderT5StateDictConverter(state_dict)


def tiny_vae_encoder_converter(state_dict):
    return _checked(FluxVAEEncoderStateDictConverter, state_dict, "tiny VAE encoder", "encoder.")


def tiny_vae_decoder_converter(state_dict):
    return _checked(FluxVAEDecoderStateDictConverter, state_dict, "tiny VAE decoder", "decoder.")
