"""`load_lora` / `unload_lora` / `load_artaug`: exact merges with a bit-exact undo.

Merging goes through `artaug_kernels.lora_merge_grouped_` (fp32 accumulation, one rounding).
Before a layer is touched its weight is copied to the host, so `unload_lora` restores it
bit for bit (LIFO), and a merge that overflows to Inf is rolled back. Layers wrapped by
DiffSynth's VRAM management (FP8 storage included) cannot absorb a merge: they get the
LoRA through DiffSynth's hot-loading lists instead (with a warning).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import weakref
from dataclasses import dataclass, field

import torch
from artaug_kernels.lora_merge import LoRAMergeOverflowError, lora_merge_grouped_
from tqdm.auto import tqdm

from .formats import LoRAFormatError, LoRAPiece, parse_lora, read_lora

logger = logging.getLogger(__name__)

_MERGEABLE = (torch.float32, torch.float16, torch.bfloat16)
_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_IDS = itertools.count(1)
_BATCH = 32  # layers per grouped call on CPU (progress bar granularity)


@dataclass
class LoRAHandle:
    """Undo record of one `load_lora` call: host copies of every merged weight, and the
    entries appended to hot-loaded layers."""

    id: int
    name: str
    backups: list = field(default_factory=list)  # (module, host tensor)
    hot: list = field(default_factory=list)  # (module, lora_A, lora_B)

    @property
    def restore_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.backups)


@dataclass
class LoRAReport:
    merged: list[str]  # "component:module" merged into the weights
    hotloaded: list[str]  # layers given the LoRA through DiffSynth's hot-loading
    skipped: list[str]  # keys for parts the target does not have (with the reason)
    unmapped: list[str]  # keys that map to no module
    seconds: float
    handle: LoRAHandle | None
    restore_bytes: int
    formats: list[str]

    def __str__(self) -> str:
        return (f"LoRA: {len(self.merged)} layers merged, {len(self.hotloaded)} hot-loaded, {len(self.skipped)} "
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
        from artaug_ext.hub import CATALOGUE, catalogue_lookup, resolve_model_files

        if catalogue_lookup(lora) is None:
            raise FileNotFoundError(f"LoRA {lora!r}: no such file or folder, and not a model we know by id "
                                    f"({', '.join(sorted(CATALOGUE))})")
        files = resolve_model_files(lora)
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


def load_lora(target, lora, alpha: float = 1.0, *, strict: bool = True) -> LoRAReport:
    """Merge a LoRA into a FluxImagePipeline (DiT, CLIP and T5 text encoders) or a module.

    `lora`: a path (.safetensors, .pt, PEFT folder), a state dict, or a hub id. Keys that map
    to no module raise (strict=False: a warning with the count); a LoRA that maps to nothing
    always raises. Returns a report whose handle `unload_lora` uses to undo the merge.
    """
    t0 = time.perf_counter()
    state_dict, meta, name = _resolve_source(lora)
    parsed = parse_lora(state_dict, meta)
    comps = _components(target)
    named = {c: dict(m.named_modules()) for c, m in comps.items()}

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
        lo, hi = (0, out_f) if p.rows is None else (p.rows[0] * in_f, p.rows[1] * in_f)
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

    if unmapped:
        msg = f"{len(unmapped)} LoRA keys map to no module of the target: {_summarise(unmapped)}"
        if strict:
            raise LoRAFormatError(msg + " (pass strict=False to merge the rest)")
        logger.warning(msg)
    if not merge_groups and not hot_groups:
        raise LoRAFormatError(f"the LoRA {name!r} matches no layer of the target "
                              f"({len(state_dict)} keys; formats seen: {sorted(parsed.formats) or 'none'})")

    handle = LoRAHandle(id=next(_IDS), name=name)
    merged = _merge(named, _row_groups(named, merge_groups, alpha), handle)
    hotloaded = _hotload(named, hot_groups, alpha, handle)
    _STACKS.setdefault(target, []).append(handle)
    report = LoRAReport(merged=merged, hotloaded=hotloaded, skipped=skipped, unmapped=unmapped,
                        seconds=time.perf_counter() - t0, handle=handle, restore_bytes=handle.restore_bytes,
                        formats=sorted(parsed.formats))
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
        for lo, hi, p in pieces:
            b = torch.zeros(rows, p.B.shape[1], dtype=torch.float32)
            b[lo:hi] = p.B.float()
            out.setdefault((comp, mod, 0, rows), []).append((p.A, b, p.scale * alpha))
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
                weights, factors = [], []
                for (comp, mod, lo, hi), pieces in items[i:i + batch]:
                    w = named[comp][mod].weight.data
                    weights.append(w[lo:hi])
                    factors.append([(_factor(a, w.device), _factor(b, w.device), s) for a, b, s in pieces])
                lora_merge_grouped_(weights, factors)
    except LoRAMergeOverflowError as e:
        _restore(handle)
        bad = [f"{k[0]}:{k[1]}" for k, _ in items[i:i + batch]]
        bad = [bad[j] for j in e.layers]
        raise LoRAMergeOverflowError(e.layers, f"merging the LoRA overflowed to Inf in {_summarise(bad)}; "
                                               "all weights were restored") from None
    except Exception:
        _restore(handle)
        raise
    return sorted({f"{comp}:{mod}" for comp, mod, _, _ in groups})


def _factor(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=t.dtype if t.dtype in _MERGEABLE else torch.float32)


def _hotload(named, groups, alpha, handle) -> list[str]:
    """DiffSynth's hot-loading: one (A, B) pair per layer in the layer's LoRA lists."""
    if not groups:
        return []
    logger.warning("%d layers are under DiffSynth VRAM management or stored in FP8: the LoRA is hot-loaded "
                   "there (applied at every forward) instead of merged", len(groups))
    done = []
    for (comp, mod), pieces in groups.items():
        module = named[comp][mod]
        out_f, in_f = module.weight.shape
        r = sum(p.A.shape[0] for p in pieces)
        a = torch.cat([p.A.float() * (p.scale * alpha) for p in pieces], dim=0)
        b = torch.zeros(out_f, r, dtype=torch.float32)
        c = 0
        for p in pieces:
            lo = 0 if p.rows is None else p.rows[0] * in_f
            b[lo:lo + p.B.shape[0], c:c + p.A.shape[0]] = p.B.float()
            c += p.A.shape[0]
        if not hasattr(module, "lora_A_weights"):
            module.lora_A_weights, module.lora_B_weights = [], []
        module.lora_A_weights.append(a)
        module.lora_B_weights.append(b)
        handle.hot.append((module, a, b))
        done.append(f"{comp}:{mod}")
    return done


def _restore(handle: LoRAHandle) -> None:
    with torch.no_grad():
        for module, saved in handle.backups:
            module.weight.data.copy_(saved)
    for module, a, b in handle.hot:
        module.lora_A_weights[:] = [t for t in module.lora_A_weights if t is not a]
        module.lora_B_weights[:] = [t for t in module.lora_B_weights if t is not b]


def unload_lora(target, handle: LoRAHandle | LoRAReport | None = None) -> int:
    """Undo `load_lora` bit-exactly. Without a handle, every LoRA loaded into `target` is
    undone (last first); with one, it must be the most recent (LIFO). Returns how many
    loads were undone."""
    stack = _STACKS.get(target, [])
    if isinstance(handle, LoRAReport):
        handle = handle.handle
    if handle is None:
        n = len(stack)
        while stack:
            _restore(stack.pop())
        return n
    if handle not in stack:
        raise ValueError(f"LoRA handle {handle.id} ({handle.name}) is not loaded in this target")
    if stack[-1] is not handle:
        later = [h.name for h in stack[stack.index(handle) + 1:]]
        raise ValueError(f"unload in LIFO order: {len(later)} LoRA(s) were loaded after this one ({_summarise(later, 4)})")
    _restore(stack.pop())
    return 1


_ARTAUG_KEYS = {"flux-dev": "artaug", "kontext": "artaug-kontext"}


def load_artaug(pipe, alpha: float = 1.0, variant: str = "flux-dev", model_dir: str | None = None,
                *, strict: bool = True) -> LoRAReport:
    """Resolve the released ArtAug LoRA (ModelScope DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1, or
    FLUX.1-Kontext-dev-lora-ArtAug for variant="kontext") through the hub layer and merge it."""
    if variant not in _ARTAUG_KEYS:
        raise ValueError(f"variant must be one of {sorted(_ARTAUG_KEYS)}, got {variant!r}")
    from artaug_ext.hub import resolve_model_files

    files = resolve_model_files(_ARTAUG_KEYS[variant], model_dir)
    paths = [p for p in files.get("lora", []) if p.endswith(".safetensors")] or files.get("lora", [])
    if not paths:
        raise FileNotFoundError(f"the hub entry {_ARTAUG_KEYS[variant]!r} has no 'lora' file")
    return load_lora(pipe, paths[0], alpha, strict=strict)
