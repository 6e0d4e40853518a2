"""Registration of our model classes into DiffSynth's model registry.

DiffSynth recognises a checkpoint by the MD5 of its safetensors header (keys and shapes)
and looks the hash up in `diffsynth.configs.MODEL_CONFIGS`, a plain list with no
registration API. The loader imported that list object by name, so entries must be
appended to it in place (rebinding the name would not reach the loader), and every entry
needs a `model_hash` because the loader reads it from every entry.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging

from diffsynth.core.loader.file import convert_keys_dict_to_single_str

logger = logging.getLogger(__name__)

_MARK = "_artaug_ext"

_FLUX_VRAM_MAPS = {
    "artaug_ext.tiny.models.TinyFluxDiT": "diffsynth.models.flux_dit.FluxDiT",
    "artaug_ext.tiny.models.TinyFluxTextEncoderClip": "diffsynth.models.flux_text_encoder_clip.FluxTextEncoderClip",
    "artaug_ext.tiny.models.TinyFluxTextEncoderT5": "diffsynth.models.flux_text_encoder_t5.FluxTextEncoderT5",
    "artaug_ext.tiny.models.TinyFluxVAEEncoder": "diffsynth.models.flux_vae.FluxVAEEncoder",
    "artaug_ext.tiny.models.TinyFluxVAEDecoder": "diffsynth.models.flux_vae.FluxVAEDecoder",
}


def keys_hash(shapes: dict[str, list[int]]) -> str:
    """DiffSynth's model hash of a file whose tensors have these keys and shapes."""
    return hashlib.md5(convert_keys_dict_to_single_str(shapes).encode("utf-8")).hexdigest()


def tiny_model_entries(spec) -> list[dict]:
    """MODEL_CONFIGS entries for one tiny spec (hashes computed from shapes on `meta`)."""
    from .tiny.build import build_modules, file_state_dicts

    files = file_state_dicts(build_modules(spec, device="meta"))
    h = {role: keys_hash({k: list(v.shape) for k, v in sd.items()}) for role, sd in files.items()}
    m, c = "artaug_ext.tiny.models.", "artaug_ext.tiny.converters."
    return [
        dict(model_hash=h["dit"], model_name="flux_dit", model_class=m + "TinyFluxDiT",
             state_dict_converter=c + "tiny_dit_converter", extra_kwargs=dict(spec.dit)),
        dict(model_hash=h["text_encoder"], model_name="flux_text_encoder_clip", model_class=m + "TinyFluxTextEncoderClip",
             state_dict_converter=c + "tiny_clip_converter", extra_kwargs=dict(spec.clip)),
        dict(model_hash=h["text_encoder_2"], model_name="flux_text_encoder_t5", model_class=m + "TinyFluxTextEncoderT5",
             state_dict_converter=c + "tiny_t5_converter", extra_kwargs=dict(spec.t5)),
        dict(model_hash=h["vae"], model_name="flux_vae_encoder", model_class=m + "TinyFluxVAEEncoder",
             state_dict_converter=c + "tiny_vae_encoder_converter", extra_kwargs=dict(spec.vae)),
        dict(model_hash=h["vae"], model_name="flux_vae_decoder", model_class=m + "TinyFluxVAEDecoder",
             state_dict_converter=c + "tiny_vae_decoder_converter", extra_kwargs=dict(spec.vae)),
    ]


def metric_model_entries() -> list[dict]:
    """MODEL_CONFIGS entries for the tiny metric checkpoints, one per (hash, model name)."""
    from .tiny.metrics import MARK, metric_model_specs

    entries: dict[tuple[str, str], dict] = {}
    for spec in metric_model_specs():
        entry = dict(model_hash=keys_hash(spec["shapes"]), model_name=spec["model_name"],
                     model_class=spec["model_class"], state_dict_converter=spec["state_dict_converter"],
                     extra_kwargs=spec["extra_kwargs"], **{_MARK: MARK})
        key = (entry["model_hash"], entry["model_name"])
        if key in entries and entries[key] != entry:
            raise ValueError(f"tiny metric {spec['name']!r}: same file hash as another spec but a different entry; "
                             "give it its own sizes in TINY_METRICS (artaug_ext/tiny/metrics.py)")
        entries[key] = entry
    return list(entries.values())


def _registry():
    """DiffSynth's registry module. Through sys.modules, not `diffsynth.configs`: registration
    also runs from the import hook while `diffsynth.configs` is being imported, before the
    package attribute is bound."""
    return importlib.import_module("diffsynth.configs.model_configs")


def our_entries() -> list[dict]:
    return [e for e in _registry().MODEL_CONFIGS if e.get(_MARK)]


@functools.cache
def all_entries() -> tuple[dict, ...]:
    """Every entry we register: the tiny FLUX models' and the tiny metric checkpoints' (the
    latter let the tests load diffsynth.metrics offline), each marked with `_artaug_ext`.
    Computed once a process (the hashes come from building every model on `meta`, 0.3 s):
    `register()` runs on every pipeline load."""
    from .tiny.spec import SPECS

    entries = [dict(e, **{_MARK: spec.name}) for spec in SPECS.values() for e in tiny_model_entries(spec)]
    return tuple(entries + metric_model_entries())


def register() -> int:
    """Append our models' entries to DiffSynth's model registry in place.

    `import artaug_ext` already does this the moment DiffSynth imports its registry; call it
    yourself only if DiffSynth's registry was reloaded. Safe to call any number of times.

    Returns:
        How many entries were added (0 when they were all there already).

    Example:
        >>> import artaug_ext
        >>> artaug_ext.register() >= 0
        True
    """
    configs = _registry().MODEL_CONFIGS
    present = {(e["model_hash"], e["model_name"]) for e in configs}
    added = 0
    for entry in all_entries():
        key = (entry["model_hash"], entry["model_name"])
        if key in present:
            continue
        configs.append(entry)  # in place: the loader holds this very list
        present.add(key)
        added += 1
    module_maps = importlib.import_module("diffsynth.configs.vram_management_module_maps").VRAM_MANAGEMENT_MODULE_MAPS
    for ours, theirs in _FLUX_VRAM_MAPS.items():
        if ours not in module_maps and theirs in module_maps:
            module_maps[ours] = module_maps[theirs]
    if added:
        logger.debug("registered %d entries into diffsynth.configs.MODEL_CONFIGS", added)
    return added
