"""Switch DiffSynth's FLUX.1 attention to the fused Triton kernel, per module, reversibly.

`apply_kernels(target)` replaces, on each instance found under `target` (a
`FluxImagePipeline`, a `FluxDiT`, a ControlNet, or any module holding the blocks):

- `FluxJointAttention.forward` (projections -> fused attention -> output projections);
- `FluxSingleTransformerBlock.process_attention` (strided qkv view -> fused attention).

Instance attributes are set (the classes are untouched), so `remove_kernels` restores
DiffSynth's code exactly, and `torch.compile`d blocks re-trace on their guards. Each
call falls back to DiffSynth's own method when the kernel cannot serve it; the reason is
counted in `kernel_stats()`. The replaced code was written against diffsynth 2.1.12;
`apply_kernels` refuses to patch methods whose source differs from that version's.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import logging
import types

import torch

from .errors import ArtaugError

logger = logging.getLogger(__name__)

# sha256 (first 16 hex digits) of inspect.getsource of what the replacements re-implement,
# as shipped in diffsynth 2.1.12.
EXPECTED_SOURCES = {
    "FluxJointAttention.forward": "7c1f9c38f87c461d",
    "FluxJointAttention.apply_rope": "e3f451b54ddc7532",
    "FluxSingleTransformerBlock.process_attention": "c59c6c9a69bff200",
    "FluxSingleTransformerBlock.apply_rope": "e3f451b54ddc7532",
    "RMSNorm.forward": "057ef583fa6bb4a6",
}

FALLBACK_REASONS = ("attn_mask", "ipadapter", "autograd", "vram_managed", "dtype", "head_dim", "device", "rope",
                    "unsupported")

_SAVED_ATTR = "_artaug_kernel_saved"
_MISSING = object()
_fallbacks: collections.Counter = collections.Counter()
_launch_base = 0


class KernelPatchError(ArtaugError, RuntimeError):
    """The installed DiffSynth differs from what the kernel patch was written against."""


def _diffsynth_classes():
    from diffsynth.models import flux_dit
    from diffsynth.models.general_modules import RMSNorm

    return flux_dit.FluxJointAttention, flux_dit.FluxSingleTransformerBlock, RMSNorm


def _kernel_module():
    from artaug_kernels import flux_attention as fa

    return fa


def _source_hash(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]


def check_diffsynth_compat() -> None:
    """Raise `KernelPatchError` if a method the patch re-implements changed in DiffSynth."""
    joint, single, rmsnorm = _diffsynth_classes()
    found = {
        "FluxJointAttention.forward": joint.forward,
        "FluxJointAttention.apply_rope": joint.apply_rope,
        "FluxSingleTransformerBlock.process_attention": single.process_attention,
        "FluxSingleTransformerBlock.apply_rope": single.apply_rope,
        "RMSNorm.forward": rmsnorm.forward,
    }
    changed = []
    for name, fn in found.items():
        try:
            got = _source_hash(fn)
        except (OSError, TypeError):
            got = "<no source>"
        if got != EXPECTED_SOURCES[name]:
            changed.append(f"{name} (sha {got}, expected {EXPECTED_SOURCES[name]})")
    if changed:
        import diffsynth

        version = getattr(diffsynth, "__version__", "unknown")
        raise KernelPatchError(
            "artaug kernels were written against diffsynth 2.1.12; these methods differ in the installed "
            f"diffsynth ({version}): {', '.join(changed)}. Not patching; run without kernels (--no-kernels)."
        )


# ----------------------------------------------------------------------------- stats


def _count_fallback(reason: str) -> None:
    # Python side effects inside a torch.compile trace would be baked into the graph.
    if not torch.compiler.is_compiling():
        _fallbacks[reason] += 1


def kernel_stats() -> dict:
    """How often the fused kernel ran, and why it did not, since the last `reset_kernel_stats()`.

    Returns:
        `{"kernel": launches, "fallback": {reason: calls}, "fallbacks": total}`. Launches are
            counted by the op, so compiled graphs count too; fallbacks are counted on eager calls
            only. Reasons: `attn_mask`, `ipadapter`, `autograd`, `vram_managed`, `dtype`,
            `head_dim`, `device`, `rope`, `unsupported`.

    Raises:
        ImportError: Triton is not installed.

    Example:
        >>> import artaug_ext
        >>> sorted(artaug_ext.kernel_stats())
        ['fallback', 'fallbacks', 'kernel']
    """
    launches = _kernel_module().STATS["launches"] - _launch_base
    return {"kernel": launches, "fallback": dict(_fallbacks), "fallbacks": sum(_fallbacks.values())}


def reset_kernel_stats() -> None:
    """Start the counts of `kernel_stats()` again from zero.

    Example:
        >>> import artaug_ext
        >>> artaug_ext.reset_kernel_stats()
        >>> artaug_ext.kernel_stats()["fallbacks"]
        0
    """
    global _launch_base
    _launch_base = _kernel_module().STATS["launches"]
    _fallbacks.clear()


# ----------------------------------------------------------------------------- eligibility


def _common_reason(module, x, norms, freqs, num_heads, head_dim, seq_len, params_need_grad):
    """Why the fused kernel cannot serve this call (None if it can)."""
    from diffsynth.core.vram.layers import AutoTorchModule

    fa = _kernel_module()
    _, _, rmsnorm = _diffsynth_classes()
    if torch.is_grad_enabled() and (x.requires_grad or params_need_grad):
        return "autograd"
    if any(isinstance(m, AutoTorchModule) for m in module.children()):
        return "vram_managed"
    if any(type(n) is not rmsnorm or n.weight is None for n in norms):
        return "unsupported"
    if len({n.eps for n in norms}) != 1:
        return "unsupported"
    if x.dtype not in fa.SUPPORTED_DTYPES or any(n.weight.dtype != x.dtype for n in norms):
        return "dtype"
    if head_dim not in fa.SUPPORTED_HEAD_DIMS:
        return "head_dim"
    if x.device.type == "cpu":
        if not fa.INTERPRET:
            return "device"
    elif x.device.type != "cuda":
        return "device"
    if any(n.weight.device != x.device for n in norms):
        return "device"
    if (
        not isinstance(freqs, torch.Tensor)
        or freqs.dim() != 6
        or tuple(freqs.shape[1:]) != (1, seq_len, head_dim // 2, 2, 2)
        or freqs.shape[0] not in (1, x.shape[0])
        or not freqs.is_floating_point()
        or freqs.device != x.device
    ):
        return "rope"
    return None


def _joint_forward(self, hidden_states_a, hidden_states_b, image_rotary_emb, attn_mask=None,
                   ipadapter_kwargs_list=None):
    """FluxJointAttention.forward through the fused kernel (a = image, b = text)."""
    joint, _, _ = _diffsynth_classes()
    reason = None
    if attn_mask is not None:
        reason = "attn_mask"
    elif ipadapter_kwargs_list is not None:
        reason = "ipadapter"
    else:
        norms = (self.norm_q_b, self.norm_k_b, self.norm_q_a, self.norm_k_a)
        params_need_grad = any(p.requires_grad for p in self.parameters())
        x_grad = hidden_states_a if hidden_states_a.requires_grad else hidden_states_b
        reason = _common_reason(self, x_grad, norms, image_rotary_emb, self.num_heads, self.head_dim,
                                hidden_states_a.shape[1] + hidden_states_b.shape[1], params_need_grad)
        if reason is None and hidden_states_b.dtype != hidden_states_a.dtype:
            reason = "dtype"
    if reason is not None:
        _count_fallback(reason)
        return joint.forward(self, hidden_states_a, hidden_states_b, image_rotary_emb, attn_mask,
                             ipadapter_kwargs_list)
    fa = _kernel_module()
    qkv_a = self.a_to_qkv(hidden_states_a)
    qkv_b = self.b_to_qkv(hidden_states_b)
    out = fa.flux_attention(
        qkv_a, self.norm_q_a.weight, self.norm_k_a.weight, image_rotary_emb, self.num_heads,
        eps=self.norm_q_a.eps, qkv_txt=qkv_b, wq_txt=self.norm_q_b.weight, wk_txt=self.norm_k_b.weight,
    )
    s_b = hidden_states_b.shape[1]
    out_b, out_a = out[:, :s_b], out[:, s_b:]
    out_a = self.a_to_out(out_a)
    if self.only_out_a:
        return out_a
    return out_a, self.b_to_out(out_b)


def _single_process_attention(self, hidden_states, image_rotary_emb, attn_mask=None, ipadapter_kwargs_list=None):
    """FluxSingleTransformerBlock.process_attention through the fused kernel; reads the
    strided qkv view of to_qkv_mlp's output in place."""
    _, single, _ = _diffsynth_classes()
    reason = None
    if attn_mask is not None:
        reason = "attn_mask"
    elif ipadapter_kwargs_list is not None:
        reason = "ipadapter"
    else:
        norms = (self.norm_q_a, self.norm_k_a)
        params_need_grad = any(n.weight is not None and n.weight.requires_grad for n in norms)
        reason = _common_reason(self, hidden_states, norms, image_rotary_emb, self.num_heads, self.head_dim,
                                hidden_states.shape[1], params_need_grad)
        if reason is None and hidden_states.stride(-1) != 1:
            reason = "unsupported"
    if reason is not None:
        _count_fallback(reason)
        return single.process_attention(self, hidden_states, image_rotary_emb, attn_mask, ipadapter_kwargs_list)
    return _kernel_module().flux_attention(
        hidden_states, self.norm_q_a.weight, self.norm_k_a.weight, image_rotary_emb, self.num_heads,
        eps=self.norm_q_a.eps,
    )


# ----------------------------------------------------------------------------- apply / remove


def _replacements():
    joint, single, _ = _diffsynth_classes()
    return ((joint, "forward", _joint_forward), (single, "process_attention", _single_process_attention))


def _iter_modules(target):
    if isinstance(target, torch.nn.Module):
        yield from target.modules()
        return
    seen = set()
    for value in vars(target).values():
        if isinstance(value, torch.nn.Module):
            for m in value.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    yield m


def apply_kernels(target) -> int:
    """Switch every FLUX.1 attention under `target` to the fused Triton kernel.

    One kernel does per-head RMSNorm of q and k, RoPE and flash attention from the blocks' fused
    qkv projections. Each call falls back to DiffSynth's own code when the kernel cannot serve
    it (attention masks, IP-Adapter, autograd, VRAM-managed layers, other dtypes or head sizes,
    CPU tensors), counted by reason in `kernel_stats()`. Safe to call twice (patched modules are
    skipped) and before or after `pipe.compile_pipeline()`.

    Args:
        target: a `FluxImagePipeline`, a `FluxDiT`, or any module holding FLUX blocks.

    Returns:
        How many attention modules were patched.

    Raises:
        KernelPatchError: the installed DiffSynth's attention code differs from 2.1.12's, which
            the kernel re-implements.
        ImportError: Triton is not installed.

    Example:
        >>> import artaug_ext
        >>> pipe = artaug_ext.load_pipeline("tiny", device="cpu")
        >>> artaug_ext.apply_kernels(pipe) > 0
        True
        >>> artaug_ext.remove_kernels(pipe) > 0
        True
    """
    check_diffsynth_compat()
    _kernel_module()  # fail here, not mid-generation, if Triton is missing
    count = 0
    for module in _iter_modules(target):
        for cls, name, fn in _replacements():
            if not isinstance(module, cls) or _SAVED_ATTR in module.__dict__:
                continue
            if getattr(type(module), name) is not getattr(cls, name):
                logger.warning("not patching %s: its class overrides %s", type(module).__name__, name)
                continue
            module.__dict__[_SAVED_ATTR] = (name, module.__dict__.get(name, _MISSING))
            module.__dict__[name] = types.MethodType(fn, module)
            count += 1
    logger.info("artaug kernels: patched %d attention modules", count)
    return count


def remove_kernels(target) -> int:
    """Undo `apply_kernels`: DiffSynth's own attention code again, bit-exactly.

    Args:
        target: the pipeline or module `apply_kernels` was given (or one holding it).

    Returns:
        How many attention modules were restored (0 when none was patched).

    Example:
        >>> import artaug_ext
        >>> pipe = artaug_ext.load_pipeline("tiny", device="cpu")
        >>> artaug_ext.remove_kernels(pipe)
        0
    """
    count = 0
    for module in _iter_modules(target):
        saved = module.__dict__.pop(_SAVED_ATTR, None)
        if saved is None:
            continue
        name, previous = saved
        if previous is _MISSING:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = previous
        count += 1
    logger.info("artaug kernels: restored %d attention modules", count)
    return count
