"""`load_lora` / `unload_lora` / `load_artaug`: exact merges with a bit-exact undo.

Merging goes through `artaug_kernels.lora_merge_grouped_` (fp32 accumulation, one rounding).
Before a layer is touched its weight is copied to the host, so `unload_lora` restores it
bit for bit, and a merge that produces NaN or Inf is rolled back and named. The undo record
(a `LoRAHandle`) is owned by the call's result and also by every module it touched, so it
works whatever object is later passed to `unload_lora` (the pipeline or its DiT), and a load
that fails or is interrupted half-way leaves the weights as they were. `undo=False` keeps no
host copy (a merge meant to stay, such as a run's running base: at FLUX.1-dev scale the copy
is about 24 GB): the merge is checked on scratch copies of a few rows at a time before any
weight is written, and `unload_lora` reads those weights back from the model files. Layers wrapped by
DiffSynth's VRAM management (FP8 storage included) cannot absorb a merge: they get the LoRA
through DiffSynth's hot-loading lists instead (with a warning).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from artaug_kernels.lora_merge import LoRAMergeOverflowError, lora_merge_grouped_
from tqdm.auto import tqdm

from ..errors import NonFiniteError, UsageError
from .formats import LoRAFormatError, LoRAPiece, parse_lora, read_lora, stack_pieces

logger = logging.getLogger(__name__)

_MERGEABLE = (torch.float32, torch.float16, torch.bfloat16)
_IDS = itertools.count(1)
_BATCH = 32  # layers per grouped call on CPU (progress bar granularity)
_SCRATCH_ELEMS = 1 << 22  # elements of the scratch rows a merge without an undo is checked on
# Attribute of a module holding the handles of the LoRAs merged or hot-loaded into it, oldest first.
_STACK_ATTR = "_artaug_lora_handles"


class LoRAMergeError(NonFiniteError, LoRAMergeOverflowError):
    """A merge produced NaN or Inf; `layers` names them ("component:module"). Unlike the raw
    kernel's error, `load_lora` has restored every weight before raising this."""

    def __init__(self, layers: list[str], message: str):
        Exception.__init__(self, message)
        self.layers = list(layers)


@dataclass(eq=False)
class LoRAHandle:
    """Undo record of one `load_lora` call: host copies of every merged weight, and the
    entries appended to hot-loaded layers. `active` is False once undone."""

    id: int
    name: str
    backups: list = field(default_factory=list)  # (module, host tensor)
    hot: list = field(default_factory=list)  # (module, lora_A, lora_B)
    active: bool = True
    # False: merged with load_lora(..., undo=False): no backups; the touched modules, by
    # (component, module name), are read back from the model files instead.
    undoable: bool = True
    reload: list = field(default_factory=list)  # (component, module name, module)

    @property
    def restore_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.backups)

    def modules(self) -> list[torch.nn.Module]:
        seen = {}
        for m, *_ in self.backups + self.hot + [(m,) for _, _, m in self.reload]:
            seen.setdefault(id(m), m)
        return list(seen.values())


@dataclass
class LoRAReport:
    """What `load_lora` did: `print(report)` gives a one-line summary.

    Attributes:
        merged: "component:module" of the layers merged into their weights.
        hotloaded: layers given the LoRA through DiffSynth's hot-loading (VRAM-managed / FP8).
        skipped: keys for parts the target does not have, with the reason.
        unmapped: keys that map to no module.
        seconds: wall time of the load.
        handle: what `unload_lora` undoes.
        restore_bytes: host memory held for the undo.
        formats: the LoRA formats recognised in the file.
    """

    merged: list[str]  # "component:module" merged into the weights
    hotloaded: list[str]  # layers given the LoRA through DiffSynth's hot-loading
    skipped: list[str]  # keys for parts the target does not have (with the reason)
    unmapped: list[str]  # keys that map to no module
    seconds: float
    handle: LoRAHandle | None
    restore_bytes: int
    formats: list[str]
    quantized: list[str] = field(default_factory=list)  # the quantisation methods of the hot-loaded layers

    def __str__(self) -> str:
        why = f" (quantised base, {', '.join(self.quantized)}: hot-loaded, not merged)" if self.quantized else ""
        return (f"LoRA: {len(self.merged)} layers merged, {len(self.hotloaded)} hot-loaded{why}, {len(self.skipped)} "
                f"skipped, {len(self.unmapped)} unmapped keys, {self.seconds * 1000:.1f} ms, "
                f"{self.restore_bytes / 2**20:.1f} MiB restore data on the host")


_COMPONENT_NAMES = {"dit": "DiT", "te1": "text encoder 1 (CLIP)", "te2": "text encoder 2 (T5)"}


def _components(target) -> dict[str, torch.nn.Module]:
    """Which DiffSynth components a target offers: a pipeline gives its DiT, CLIP and T5
    encoders; a module is a DiT unless it looks like the CLIP encoder (`encoders`) or the
    transformers T5 encoder (`encoder.block`)."""
    if hasattr(target, "dit") or hasattr(target, "text_encoder_1") or hasattr(target, "text_encoder_2"):
        comps = {"dit": getattr(target, "dit", None), "te1": getattr(target, "text_encoder_1", None),
                 "te2": getattr(target, "text_encoder_2", None)}
        return {k: v for k, v in comps.items() if v is not None}
    if not isinstance(target, torch.nn.Module):
        raise TypeError(f"load_lora: target must be a FluxImagePipeline or a torch.nn.Module, got {type(target).__name__}")
    if hasattr(target, "encoders") and not hasattr(target, "blocks"):
        return {"te1": target}
    if hasattr(getattr(target, "encoder", None), "block") and not hasattr(target, "blocks"):
        return {"te2": target}
    return {"dit": target}


_PIPELINE_ATTRS = {"dit": "dit", "te1": "text_encoder_1", "te2": "text_encoder_2"}


def _hot_loadable_if_quantized(target, comps: dict) -> dict:
    """A component DiffSynth quantised (it carries `quantize_config`) takes LoRAs by
    hot-loading only: if it is not yet wrapped for that (a pipeline built with DiffSynth's own
    `ModelConfig(quantize=...)` rather than `load_pipeline`), wrap it through the pipeline's
    `enable_lora_hot_loading`, as DiffSynth's own `pipe.load_lora` does."""
    out = dict(comps)
    for comp, module in comps.items():
        if getattr(module, "quantize_config", None) is None or getattr(module, "vram_management_enabled", False):
            continue
        if not hasattr(target, "enable_lora_hot_loading"):
            raise LoRAFormatError(f"the {_COMPONENT_NAMES[comp]} is quantised ({module.quantize_config.method}) and not "
                                  "wrapped for hot-loading: pass the pipeline (load_lora(pipe, ...)), which wraps it")
        out[comp] = target.enable_lora_hot_loading(module)
        setattr(target, _PIPELINE_ATTRS[comp], out[comp])
    return out


def _hotload_only(name: str, module: torch.nn.Module) -> bool:
    """DiffSynth's wrapped layers (VRAM management, FP8 storage) apply their LoRA lists at
    every forward: hot-load there. Plain layers are merged, so one whose weight cannot take
    the merge is an error (nothing would ever read a LoRA list on a plain layer)."""
    from diffsynth.core.vram.layers import LoRAHotLoadMixin

    if isinstance(module, LoRAHotLoadMixin):
        return True
    if module.weight.dtype not in _MERGEABLE:
        raise LoRAFormatError(
            f"{name}: weight is {module.weight.dtype}, which a LoRA cannot be merged into; load the model in "
            "bf16/fp16/fp32, or keep it in that dtype through DiffSynth's VRAM management "
            "(ModelConfig(..., offload_dtype=...)), where LoRAs are hot-loaded")
    return False


def _resolve_source(lora):
    if isinstance(lora, dict):
        return lora, {}, "state dict"
    if isinstance(lora, (str, os.PathLike)) and os.path.exists(lora):
        sd, meta = read_lora(lora)
        return sd, meta, os.fspath(lora)
    if isinstance(lora, str):
        from artaug_ext.cards import hub_lookup, known_names
        from artaug_ext.hub import resolve_model_files

        entry = hub_lookup(lora)
        if entry is None or entry.kind != "lora":
            raise LoRAFormatError(f"LoRA {lora!r}: no such file or folder, and not a LoRA we know by name "
                                  f"({', '.join(known_names('lora'))})")
        files = resolve_model_files(entry)
        paths = files.get("lora") or [p for ps in files.values() for p in ps]
        if not paths:
            raise FileNotFoundError(f"hub entry {lora!r} resolved to no files")
        sd, meta = read_lora(paths[0])
        return sd, meta, paths[0]
    raise TypeError(f"lora must be a path, a state dict or a hub id, got {type(lora).__name__}")


def _summarise(keys: list[str], n: int = 12) -> str:
    head = ", ".join(keys[:n])
    return head + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    if t.is_cuda:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out
    return t.detach().clone()


def _map_pieces(parsed, comps: dict, named: dict) -> tuple[dict, dict, list[str], list[str]]:
    """Each parsed LoRA piece onto its module: (merge groups by (component, module) with their
    row ranges, hot-load groups, skipped and unmapped keys); a shape that cannot fit raises."""
    skipped, unmapped = [], list(parsed.unmapped)
    merge_groups: dict[tuple, list] = {}
    hot_groups: dict[tuple, list[LoRAPiece]] = {}
    for p in parsed.pieces:
        if p.component not in comps:
            skipped.append(f"{p.source} (target has no {_COMPONENT_NAMES[p.component]})")
            continue
        module = named[p.component].get(p.module)
        if module is None or getattr(module, "weight", None) is None:
            if p.module.startswith("guidance_embedder") and getattr(comps[p.component], "guidance_embedder", 1) is None:
                skipped.append(f"{p.source} (this DiT has no guidance embedder)")
            else:
                unmapped.append(f"{p.source} (no module {p.module})")
            continue
        weight = module.weight
        if weight.dim() != 2:
            raise LoRAFormatError(f"{p.module}: weight has shape {tuple(weight.shape)}; only linear layers take a LoRA")
        out_f, in_f = weight.shape
        lo, hi = p.row_range(out_f) if p.A.shape[1] == in_f else (0, out_f)
        want_b, want_a = (hi - lo, p.A.shape[0]), (p.A.shape[0], in_f)
        if hi > out_f or tuple(p.B.shape) != want_b or tuple(p.A.shape) != want_a:
            raise LoRAFormatError(
                f"shape mismatch for {p.component}:{p.module} (from {p.source}): weight {tuple(weight.shape)}"
                f"{'' if p.rows is None else f' rows {lo}:{hi}'}, LoRA A {tuple(p.A.shape)} B {tuple(p.B.shape)}"
                f" (want A {want_a}, B {want_b})")
        key = (p.component, p.module)
        if _hotload_only(f"{p.component}:{p.module}", module):
            hot_groups.setdefault(key, []).append(p)
        else:
            merge_groups.setdefault(key, []).append((lo, hi, p))
    return merge_groups, hot_groups, skipped, unmapped


def load_lora(target, lora, alpha: float = 1.0, *, strict: bool = True, undo: bool = True) -> LoRAReport:
    """Merge a LoRA exactly into a FluxImagePipeline (DiT, CLIP and T5 text encoders) or a module.

    The merge accumulates in fp32 and rounds once into the weight's dtype. Layers under
    DiffSynth's VRAM management or FP8 storage get DiffSynth's hot-loading instead (with a
    warning). A load that fails or is interrupted leaves the weights as they were.

    Args:
        target: a `FluxImagePipeline`, or one of its modules (the DiT, a text encoder).
        lora: a path (.safetensors, .pt, a PEFT folder), a state dict, or a LoRA known by name
            (`artaug`). Formats: kohya / "universal FLUX", diffusers / PEFT, DiffSynth's training
            output, BFL, XLabs, CLIP and T5 text-encoder keys.
        alpha: the LoRA's strength (a finite number; 1.0 as trained).
        strict: keys that map to no layer raise; False: a warning with their count.
        undo: keep a host copy of the touched weights for `unload_lora`; False saves that memory,
            and undoing then reads the weights back from the model files.

    Returns:
        A `LoRAReport`: the layers merged, hot-loaded and skipped, the unmapped keys, the time,
            and the `handle` that `unload_lora` undoes.

    Raises:
        UsageError: a non-finite `alpha`.
        LoRAFormatError: unmapped keys (strict), a LoRA that matches no layer, a LyCORIS / DoRA
            file (`UnsupportedLoRAError`), or shapes that do not fit.
        FileFormatError: a damaged LoRA file.
        LoRAMergeError: the merge would write NaN or Inf (the weights are restored first).

    Example:
        >>> import artaug_ext
        >>> pipe = artaug_ext.load_pipeline("tiny", device="cpu")
        >>> report = artaug_ext.load_lora(pipe, "artaug-demo/final/lora.safetensors", alpha=0.8)  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
        LoRA: 2 layers merged, 0 hot-loaded, 0 skipped, 0 unmapped keys, 3.1 ms, 0.5 MiB restore data on the host
    """
    t0 = time.perf_counter()
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise UsageError(f"LoRA strength alpha={alpha!r} must be a finite number")
    state_dict, meta, name = _resolve_source(lora)
    parsed = parse_lora(state_dict, meta)
    comps = _hot_loadable_if_quantized(target, _components(target))
    named = {c: dict(m.named_modules()) for c, m in comps.items()}

    merge_groups, hot_groups, skipped, unmapped = _map_pieces(parsed, comps, named)
    if unmapped:
        msg = f"{len(unmapped)} LoRA keys map to no module of the target: {_summarise(unmapped)}"
        if strict:
            raise LoRAFormatError(msg + " (pass strict=False to merge the rest)")
        logger.warning(msg)
    if not merge_groups and not hot_groups:
        raise LoRAFormatError(f"the LoRA {name!r} matches no layer of the target "
                              f"({len(state_dict)} keys; formats seen: {sorted(parsed.formats) or 'none'})")

    quantized = _quantized_methods(named, hot_groups)
    handle = LoRAHandle(id=next(_IDS), name=name, undoable=undo)
    try:
        groups = _row_groups(named, merge_groups, alpha)
        merged = _merge(named, groups, handle) if undo else _merge_for_good(named, groups, handle)
        hotloaded = _hotload(named, hot_groups, alpha, handle, quantized)
        for module in handle.modules():
            module.__dict__.setdefault(_STACK_ATTR, []).append(handle)
    except BaseException:
        # Anything after the first write (a failed hot-load, KeyboardInterrupt): undo it all.
        _restore(handle, getattr(target, "artaug_model_paths", None))
        raise
    report = LoRAReport(merged=merged, hotloaded=hotloaded, skipped=skipped, unmapped=unmapped,
                        seconds=time.perf_counter() - t0, handle=handle, restore_bytes=handle.restore_bytes,
                        formats=sorted(parsed.formats), quantized=quantized)
    if skipped:
        logger.info("%d LoRA layers skipped: %s", len(skipped), _summarise(skipped, 4))
    logger.info("%s", report)
    return report


def _row_groups(named, groups, alpha) -> dict[tuple, list]:
    """(component, module, lo, hi) -> [(A, B, scale)]. Pieces on the same rows share a group;
    pieces on partly overlapping rows are widened to the whole module (B zero elsewhere),
    so every weight element is rounded exactly once."""
    out: dict[tuple, list] = {}
    for (comp, mod), pieces in groups.items():
        ranges = {(lo, hi) for lo, hi, _ in pieces}
        clean = all(a == b or a[1] <= b[0] or b[1] <= a[0] for a in ranges for b in ranges)
        if clean:
            for lo, hi, p in pieces:
                out.setdefault((comp, mod, lo, hi), []).append((p.A, p.B, p.scale * alpha))
            continue
        rows = named[comp][mod].weight.shape[0]
        a, b = stack_pieces([p for _, _, p in pieces], rows, alpha)
        out[(comp, mod, 0, rows)] = [(a, b, 1.0)]
    return out


def _merge(named, groups, handle) -> list[str]:
    """Back up every touched weight, then merge in batches; on overflow restore all."""
    if not groups:
        return []
    seen = {}
    for comp, mod, _, _ in groups:
        module = named[comp][mod]
        if id(module) not in seen:
            seen[id(module)] = module
            handle.backups.append((module, _host_copy(module.weight.data)))
    items = list(groups.items())
    on_cpu = next(iter(seen.values())).weight.device.type == "cpu"
    batch = _BATCH if on_cpu else len(items)
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(items), batch), desc="merging LoRA", unit="batch",
                          disable=not on_cpu or len(items) <= 4 * _BATCH):
                _merge_in_place(named, items[i:i + batch])
    except LoRAMergeOverflowError as e:
        _restore(handle)
        names = [f"{k[0]}:{k[1]}" for k, _ in items[i:i + batch]]
        bad = sorted({names[j] for j in e.layers})
        raise LoRAMergeError(bad, f"merging the LoRA {handle.name} gave NaN or Inf in {len(bad)} layer(s): "
                                  f"{_summarise(bad)}; every weight was restored. Fix: lower the LoRA's alpha, "
                                  "or check the file (its factors are too large for this dtype)") from None
    return sorted({f"{comp}:{mod}" for comp, mod, _, _ in groups})


def _merge_for_good(named, groups, handle) -> list[str]:
    """A merge without a backup: every layer is first merged into a scratch copy of itself
    (a few rows at a time, so the extra memory is a few MiB on the weight's device); only when all came out
    finite are the weights merged in place (the same kernel on the same inputs)."""
    if not groups:
        return []
    items = list(groups.items())
    names = [f"{comp}:{mod}" for (comp, mod, _, _), _ in items]
    with torch.no_grad():
        bad = []
        for j, ((comp, mod, lo, hi), pieces) in enumerate(tqdm(items, desc="checking LoRA merge", unit="layer",
                                                                disable=len(items) <= 4 * _BATCH)):
            w = named[comp][mod].weight.data
            rows = max(1, _SCRATCH_ELEMS // max(w.shape[1], 1))  # each row's result depends on its own B row only
            try:
                for r0 in range(lo, hi, rows):
                    r1 = min(hi, r0 + rows)
                    lora_merge_grouped_([w[r0:r1].clone()], [[(_factor(a, w.device), _factor(b[r0 - lo:r1 - lo], w.device),
                                                               s) for a, b, s in pieces]])
            except LoRAMergeOverflowError:
                bad.append(names[j])
        if bad:
            bad = sorted(set(bad))
            raise LoRAMergeError(bad, f"merging the LoRA {handle.name} would give NaN or Inf in {len(bad)} layer(s): "
                                      f"{_summarise(bad)}; nothing was merged. Fix: lower the LoRA's alpha, or check "
                                      "the file (its factors are too large for this dtype)")
        seen = set()
        for (comp, mod, _, _) in groups:
            if (comp, mod) not in seen:
                seen.add((comp, mod))
                handle.reload.append((comp, mod, named[comp][mod]))
        for i in range(0, len(items), _BATCH):
            _merge_in_place(named, items[i:i + _BATCH])
    return sorted({f"{comp}:{mod}" for comp, mod, _, _ in groups})


def _merge_in_place(named, items) -> None:
    """W[lo:hi] += sum of scale * B @ A for each (layer, rows) of `items`, in one grouped kernel call."""
    weights, factors = [], []
    for (comp, mod, lo, hi), pieces in items:
        w = named[comp][mod].weight.data
        weights.append(w[lo:hi])
        factors.append([(_factor(a, w.device), _factor(b, w.device), s) for a, b, s in pieces])
    lora_merge_grouped_(weights, factors)


def _factor(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=t.dtype if t.dtype in _MERGEABLE else torch.float32)


def _quantized_methods(named, groups) -> list[str]:
    """The DiffSynth quantisation methods of the components the hot-load groups are in."""
    return sorted({named[comp][""].quantize_config.method for comp, _ in groups
                   if getattr(named[comp][""], "quantize_config", None) is not None})


def _hotload(named, groups, alpha, handle, quantized: list[str]) -> list[str]:
    """DiffSynth's hot-loading: one (A, B) pair per layer in the layer's LoRA lists.
    `quantized`: the quantisation methods of the groups' components (`_quantized_methods`)."""
    if not groups:
        return []
    if quantized:  # asked for (the base was quantised on purpose): said, not warned
        logger.info("%d layers are quantised (%s): a quantised weight cannot take an exact merge, so the LoRA is "
                    "hot-loaded there (applied at every forward, exact in the factors)", len(groups),
                    ", ".join(quantized))
    else:
        logger.warning("%d layers are under DiffSynth VRAM management or stored in FP8: the LoRA is hot-loaded "
                       "there (applied at every forward) instead of merged", len(groups))
    done = []
    for (comp, mod), pieces in groups.items():
        module = named[comp][mod]
        a, b = stack_pieces(pieces, module.weight.shape[0], alpha)
        if not hasattr(module, "lora_A_weights"):
            module.lora_A_weights, module.lora_B_weights = [], []
        module.lora_A_weights.append(a)
        module.lora_B_weights.append(b)
        handle.hot.append((module, a, b))
        done.append(f"{comp}:{mod}")
    return done


def _restore(handle: LoRAHandle, model_files: dict | None = None) -> None:
    """Put back every weight and hot-load list the handle touched (idempotent): from the host
    copies, or, for a merge without an undo, from the model files."""
    with torch.no_grad():
        for module, saved in handle.backups:
            module.weight.data.copy_(saved)
        if handle.reload and handle.active:
            _reload_weights(handle, model_files)
    for module, a, b in handle.hot:
        module.lora_A_weights[:] = [t for t in module.lora_A_weights if t is not a]
        module.lora_B_weights[:] = [t for t in module.lora_B_weights if t is not b]
    for module in handle.modules():
        stack = module.__dict__.get(_STACK_ATTR, [])
        if handle in stack:
            stack.remove(handle)
    handle.active = False


# The pipeline's files of each component (load_pipeline's `artaug_model_paths` roles).
_FILE_ROLES = {"dit": "dit", "te1": "text_encoder", "te2": "text_encoder_2"}


def _reload_weights(handle: LoRAHandle, model_files: dict | None) -> None:
    """The weights a merge without an undo touched, read again from the model files through
    DiffSynth's own lazy loader (`DiskMap` with the file's state-dict converter, in the
    weight's dtype and on its device: what loading the model put there), one tensor at a time."""
    from diffsynth.configs import MODEL_CONFIGS
    from diffsynth.core.loader import hash_model_file
    from diffsynth.core.vram.disk_map import DiskMap
    from diffsynth.models.model_loader import ModelPool

    by_comp: dict[str, list] = {}
    for comp, mod, module in handle.reload:
        by_comp.setdefault(comp, []).append((mod, module))
    for comp, mods in by_comp.items():
        path = (model_files or {}).get(_FILE_ROLES[comp])
        if not path:
            raise ValueError(f"the LoRA {handle.name} was merged into the {_COMPONENT_NAMES[comp]} without an undo "
                             "(load_lora(..., undo=False)): pass the pipeline that load_pipeline returned, or "
                             f"model_files={{{_FILE_ROLES[comp]!r}: path}}, so its weights are read from the file")
        configs = [c for c in MODEL_CONFIGS if c["model_hash"] == hash_model_file(path)]
        converter = next((c.get("state_dict_converter") for c in configs), None)
        converter = ModelPool().import_model_class(converter) if converter else None
        weight = mods[0][1].weight
        state = DiskMap(path, str(weight.device), torch_dtype=weight.dtype, state_dict_converter=converter)
        for mod, module in mods:
            key = f"{mod}.weight"
            if key not in state:
                raise ValueError(f"{path} has no tensor {key}: it is not the file the {_COMPONENT_NAMES[comp]} was "
                                 "loaded from; pass that file in model_files")
            module.weight.data.copy_(state[key])


def loaded_loras(target) -> list[LoRAHandle]:
    """Handles of the LoRAs loaded into any module of `target` (a pipeline or a module), oldest first."""
    found = {}
    for comp in _components(target).values():
        for module in comp.modules():
            for h in module.__dict__.get(_STACK_ATTR, []):
                found[h.id] = h
    return [found[i] for i in sorted(found)]


def unload_lora(target, handle: LoRAHandle | LoRAReport | None = None, *, model_files: dict | None = None) -> int:
    """Undo `load_lora` bit-exactly.

    Args:
        target: the pipeline or module the LoRA was loaded into (or through: the undo belongs to
            the layers, so `unload_lora(pipe.dit, handle)` undoes a `load_lora(pipe, ...)`).
        handle: the load to undo (a `LoRAReport` or its `handle`); it must be the newest LoRA
            on every layer it touched (last in, first out). None: every LoRA loaded into
            `target`, last first.
        model_files: for a merge made with `undo=False`: role -> path of the model files to read
            the weights back from (default: `pipe.artaug_model_paths` of a `load_pipeline` pipeline).

    Returns:
        How many loads were undone.

    Raises:
        ValueError: the handle was already unloaded, or a later LoRA sits on the same layers.

    Example:
        >>> import artaug_ext
        >>> pipe = artaug_ext.load_pipeline("tiny", device="cpu")
        >>> report = artaug_ext.load_lora(pipe, "artaug-demo/final/lora.safetensors")  # doctest: +SKIP
        >>> artaug_ext.unload_lora(pipe, report.handle)  # doctest: +SKIP
        1
    """
    if isinstance(handle, LoRAReport):
        handle = handle.handle
    model_files = model_files if model_files is not None else getattr(target, "artaug_model_paths", None)
    if handle is None:
        handles = loaded_loras(target)
        for h in reversed(handles):
            _restore(h, model_files)
        return len(handles)
    if not handle.active:
        raise ValueError(f"LoRA handle {handle.id} ({handle.name}) was already unloaded")
    later = {}
    for module in handle.modules():
        stack = module.__dict__.get(_STACK_ATTR, [])
        for h in stack[stack.index(handle) + 1:] if handle in stack else []:
            later[h.id] = h.name
    if later:
        names = [later[i] for i in sorted(later)]
        raise ValueError(f"unload in LIFO order: {len(names)} LoRA(s) were loaded on the same layers after this one "
                         f"({_summarise(names, 4)})")
    _restore(handle, model_files)
    return 1


def load_artaug(pipe, alpha: float = 1.0, variant: str = "flux-dev", model_dir: str | None = None,
                *, strict: bool = True) -> LoRAReport:
    """Merge the released ArtAug LoRA, found (or downloaded) through the model root.

    Args:
        pipe: a FLUX.1-dev pipeline from `load_pipeline("flux-dev")` (or FLUX.1-Kontext-dev for
            `variant="kontext"`).
        alpha: the LoRA's strength (1.0, the authors' setting).
        variant: `flux-dev` (ModelScope `DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1`) or `kontext`
            (`DiffSynth-Studio/FLUX.1-Kontext-dev-lora-ArtAug`).
        model_dir: the model root (default: as `load_pipeline`).
        strict: as in `load_lora`.

    Returns:
        The `LoRAReport` of `load_lora`; `unload_lora(pipe, report.handle)` undoes it.

    Raises:
        artaug_ext.hub.HubError: the file is missing and cannot be downloaded (offline: at once,
            naming `artaug download artaug`).
        LoRAFormatError: as in `load_lora`.

    Example:
        >>> import artaug_ext
        >>> pipe = artaug_ext.load_pipeline("flux-dev")  # doctest: +SKIP
        >>> report = artaug_ext.load_artaug(pipe, alpha=1.0)  # doctest: +SKIP
    """
    from artaug_ext.cards import artaug_lora
    from artaug_ext.hub import resolve_model_files

    entry = artaug_lora(variant)
    files = resolve_model_files(entry, model_dir)
    paths = [p for p in files.get("lora", []) if p.endswith(".safetensors")] or files.get("lora", [])
    if not paths:
        raise LoRAFormatError(f"the hub entry {entry.name!r} has no 'lora' file")
    return load_lora(pipe, paths[0], alpha, strict=strict)
