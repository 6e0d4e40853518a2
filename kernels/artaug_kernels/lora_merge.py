"""Exact in-place LoRA merge: `W <- round(W + scale * B @ A)`.

The product is accumulated in fp32 and rounded ONCE to the weight's dtype (round to
nearest even), inside the kernel. Merging in bf16 (what DiffSynth does) rounds the delta
and then the sum, which mis-rounds a few percent of the weights; we round once.

Three back ends share one formula:

- CUDA tensors: a Triton kernel, autotuned for H100, registered as a torch.library op.
- CPU tensors with `TRITON_INTERPRET=1` (how tests exercise the kernel): the same kernel
  in the interpreter, with its bf16 bugs worked around: the interpreter holds bf16 as raw
  16-bit integers (arithmetic on them is garbage) and truncates fp32 -> bf16 instead of
  rounding, so bf16 is upcast right after loading and rounded to nearest even with integer
  ops on the fp32 bits (the same arithmetic on the GPU).
- CPU tensors otherwise: plain torch, fp32 accumulation, one rounding, chunked rows so
  memory stays bounded.

Every path checks the result: an element that was finite in the weight and is NaN or Inf
after the merge (rounded to the weight's dtype) is reported per layer. The merge is in
place, so the weights then HOLD those values: `LoRAMergeOverflowError` says so, and the
caller restores from a copy (`artaug_ext.load_lora` keeps one and restores automatically).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ._env import interpreter_mode

logger = logging.getLogger(__name__)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_W_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Smallest fp32 magnitude that rounds (to nearest even) to Inf in each weight dtype: the
# overflow test must look at the ROUNDED value (fp16 overflows from 65520, far below
# fp32's range). Both thresholds are exact in fp32.
_INF_AT = {torch.float32: float("inf"), torch.float16: 65520.0, torch.bfloat16: float.fromhex("0x1.ffp127")}
# Rows per chunk in the torch path: keeps the fp32 temporaries near 16 MiB per chunk.
_CHUNK_ELEMS = 1 << 22


class LoRAMergeOverflowError(FloatingPointError):
    """Some merged weights became NaN or Inf (overflow, or Inf - Inf). `layers` lists the
    indices of the layers hit; their weights now hold the non-finite values (the merge is in
    place): restore them from a copy."""

    def __init__(self, layers: list[int], message: str | None = None):
        self.layers = list(layers)
        super().__init__(message or f"LoRA merge gave NaN or Inf in layer(s) {self.layers}; the merge is in place, "
                                    "so those weights now hold them: restore from a copy")


# ----------------------------------------------------------------------------------------
# Triton kernel (imported lazily so `import artaug_kernels` never needs Triton)
# ----------------------------------------------------------------------------------------

_KERNEL = None


def _bench_quick(fn, quantiles=None, **_):
    import triton

    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _get_kernel():
    """Build the autotuned kernel once (Triton reads TRITON_INTERPRET at decoration)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    if interpreter_mode():
        # Big tiles: the interpreter runs programs one after another, so fewer is faster;
        # tuning there only burns time.
        configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4)]
    else:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [
                (128, 128, 8, 3), (128, 256, 8, 3), (64, 256, 8, 3),
                (256, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4),
            ]
        ]

    @triton.autotune(
        configs=configs,
        key=["M", "N", "R", "W_KIND", "MMA_LOWP"],
        restore_value=["w_ptr"],
        reset_to_zero=["flag_ptr"],
        do_bench=_bench_quick,
    )
    @triton.jit
    def lora_merge_kernel(
        w_ptr, a_ptr, b_ptr, flag_ptr,
        M, N, R,
        stride_wm, stride_wn, stride_ar, stride_an, stride_bm, stride_br,
        scale, inf_at,
        W_KIND: tl.constexpr,  # 0 fp32, 1 fp16, 2 bf16 (then w_ptr is the int16 view)
        MMA_LOWP: tl.constexpr,  # factors fed to tl.dot as loaded (bf16/fp16; GPU only)
        DOT_PREC: tl.constexpr,  # operand precision for fp32 factors
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        mask_m = offs_m < M
        mask_n = offs_n < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            mask_r = rr < R
            b = tl.load(b_ptr + offs_m[:, None] * stride_bm + rr[None, :] * stride_br,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            a = tl.load(a_ptr + rr[:, None] * stride_ar + offs_n[None, :] * stride_an,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            if MMA_LOWP:
                # bf16/fp16 products are exact in fp32; the accumulation is fp32.
                acc = tl.dot(b, a, acc)
            else:
                acc = tl.dot(b.to(tl.float32), a.to(tl.float32), acc, input_precision=DOT_PREC)

        mask = mask_m[:, None] & mask_n[None, :]
        w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
        if W_KIND == 2:
            raw = tl.load(w_ptrs, mask=mask, other=0)
            w = (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        out = w + scale * acc

        # Finite in, NaN or Inf once rounded to the weight's dtype (overflow, or Inf - Inf
        # inside the product). NaN fails every comparison, hence the explicit out != out.
        w_finite = tl.abs(w) < float("inf")
        bad = ((tl.abs(out) >= inf_at) | (out != out)) & w_finite & mask
        nbad = tl.sum(bad.to(tl.int32), axis=1)
        nbad = tl.sum(nbad, axis=0)
        if nbad > 0:
            tl.atomic_max(flag_ptr, 1)

        if W_KIND == 2:
            # Round to nearest even on the fp32 bits (the interpreter's cast truncates).
            bits = out.to(tl.uint32, bitcast=True)
            lsb = (bits >> 16) & 1
            rounded = (bits + 0x7FFF + lsb) >> 16
            rounded = tl.where(out != out, (bits >> 16) | 0x40, rounded)  # quiet NaN, sign kept
            tl.store(w_ptrs, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        elif W_KIND == 1:
            tl.store(w_ptrs, out.to(tl.float16), mask=mask)
        else:
            tl.store(w_ptrs, out, mask=mask)

    _KERNEL = lora_merge_kernel
    return _KERNEL


def _launch(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
            flag: torch.Tensor) -> None:
    """Launch the Triton kernel on one layer; `flag` (int32, one element) is set on overflow."""
    import triton

    kernel = _get_kernel()
    M, N = weight.shape
    R = lora_A.shape[0]
    on_gpu = weight.is_cuda and not interpreter_mode()
    lowp = on_gpu and lora_A.dtype == lora_B.dtype and lora_A.dtype in (torch.bfloat16, torch.float16)
    if not lowp and lora_A.dtype != torch.float32:
        lora_A = lora_A.float()
    if not lowp and lora_B.dtype != torch.float32:
        lora_B = lora_B.float()
    w = weight.view(torch.int16) if weight.dtype == torch.bfloat16 else weight
    block_r = max(16, min(64, triton.next_power_of_2(R)))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    kernel[grid](
        w, lora_A, lora_B, flag, M, N, R,
        w.stride(0), w.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scale), _INF_AT[weight.dtype],
        W_KIND=_W_KIND[weight.dtype], MMA_LOWP=lowp,
        DOT_PREC="tf32x3" if on_gpu else "ieee",
        BLOCK_R=block_r,
    )


# torch.library op for CUDA, so torch.compile keeps the merge in the graph.
@torch.library.custom_op("artaug::lora_merge_", mutates_args=("weight", "flag"), device_types="cuda")
def _lora_merge_cuda(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                     flag: torch.Tensor) -> None:
    _launch(weight, lora_A, lora_B, scale, flag)


@_lora_merge_cuda.register_fake
def _(weight, lora_A, lora_B, scale, flag) -> None:
    return None


# ----------------------------------------------------------------------------------------
# torch path (CPU without the interpreter)
# ----------------------------------------------------------------------------------------

def _merge_torch(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> bool:
    """Same formula as the kernel: fp32 accumulate, one rounding, row chunks. Returns True
    when an element that was finite became NaN or Inf (the weight then holds it)."""
    M, N = weight.shape
    a32 = lora_A.to(torch.float32)
    rows = max(1, _CHUNK_ELEMS // max(N, 1))
    inf_at = _INF_AT[weight.dtype]
    bad = False
    for m0 in range(0, M, rows):
        w_chunk = weight[m0:m0 + rows]
        # w + scale * (B @ A) in the GEMM's epilogue, into a NEW fp32 tensor: for an fp32
        # weight `.to(float32)` is the weight itself, and an in-place addmm would overwrite
        # the values the check below compares against.
        out = torch.addmm(w_chunk.to(torch.float32), lora_B[m0:m0 + rows].to(torch.float32), a32, alpha=scale)
        if not bad:
            lo, hi = torch.aminmax(out)  # one pass; NaN propagates and fails both tests
            if not (float(hi) < inf_at and float(lo) > -inf_at):
                hit = ~(out.abs() < inf_at)  # NaN, or Inf once rounded to the weight's dtype
                bad = bool((hit & torch.isfinite(w_chunk)).any())
        w_chunk.copy_(out)  # the one rounding (round to nearest even)
    return bad


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------

def _check_layer(i: int, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"layer {i}: weight, lora_A and lora_B must be 2-D, got shapes "
                         f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    if weight.dtype not in _SUPPORTED:
        raise TypeError(f"layer {i}: weight dtype {weight.dtype} is not supported (bf16, fp16, fp32)")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not t.is_floating_point() or t.dtype not in _SUPPORTED:
            raise TypeError(f"layer {i}: {name} dtype {t.dtype} is not supported (bf16, fp16, fp32)")
        if t.device != weight.device:
            raise ValueError(f"layer {i}: {name} is on {t.device}, weight on {weight.device}")
    M, N = weight.shape
    if lora_A.shape[1] != N or lora_B.shape[0] != M or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"layer {i}: shape mismatch: weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)} "
                         f"(want [r, {N}]), lora_B {tuple(lora_B.shape)} (want [{M}, r])")


def _all_finite(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Indices of tensors holding NaN/Inf, with one fused max-abs pass and one device sync
    for the lot (a per-tensor check costs two launches per factor on a 300-layer DiT)."""
    if not tensors:
        return []
    try:
        norms = torch._foreach_norm(list(tensors), float("inf"))
        flags = torch.stack([n.float().to(tensors[0].device) for n in norms]).isfinite()
    except (RuntimeError, TypeError, AttributeError):
        flags = torch.stack([torch.isfinite(t).all().to(tensors[0].device) for t in tensors])
    return [i for i, ok in enumerate(flags.tolist()) if not ok]


def _prepare(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]]):
    """Several LoRAs on one layer become one by concatenating along rank, scales folded
    into B in fp32: one pass over the weight, one rounding."""
    if len(factors) == 1:
        a, b, s = factors[0]
        return a, b, float(s)
    a = torch.cat([f[0].to(torch.float32) for f in factors], dim=0)
    b = torch.cat([f[1].to(torch.float32) * float(f[2]) for f in factors], dim=1)
    return a, b, 1.0


def lora_merge_grouped_(weights: Sequence[torch.Tensor],
                        factors: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor, float]]]) -> None:
    """Merge LoRAs into many layers in place: `factors[i]` is a list of `(A, B, scale)` for
    `weights[i]` (several LoRAs per layer allowed). All inputs are checked (shapes, dtypes,
    finiteness) before anything is written; one device sync at the end checks the results
    and raises `LoRAMergeOverflowError` naming the layers where a finite weight became NaN
    or Inf. The merge is in place: those layers then hold the non-finite values."""
    if len(weights) != len(factors):
        raise ValueError(f"{len(weights)} weights but {len(factors)} factor lists")
    flat = []
    for i, (w, fs) in enumerate(zip(weights, factors, strict=True)):
        for a, b, s in fs:
            _check_layer(i, w, a, b)
            if not math.isfinite(float(s)):
                raise ValueError(f"layer {i}: scale {s} is not finite")
            flat.extend((a, b))
    bad = _all_finite(flat)
    if bad:
        raise ValueError(f"non-finite values (NaN/Inf) in LoRA factors of {len(bad)} tensor(s); nothing was merged")

    jobs = []
    for i, (w, fs) in enumerate(zip(weights, factors, strict=True)):
        fs = [f for f in fs if float(f[2]) != 0.0 and f[0].shape[0] > 0]
        if fs and w.numel():
            jobs.append((i, w, *_prepare(fs)))
    if not jobs:
        return

    # Each layer takes the path of its own device (a pipeline may keep its text encoder on
    # the CPU and its DiT on a GPU); Triton paths report overflow through per-device flags,
    # read with one sync per device at the end.
    interpret = interpreter_mode()
    overflowed = []
    flags: dict[torch.device, torch.Tensor] = {}
    for i, w, a, b, s in jobs:
        if w.is_cuda or interpret:
            if w.device not in flags:
                flags[w.device] = torch.zeros(len(weights), dtype=torch.int32, device=w.device)
            flag = flags[w.device][i:i + 1]
            if interpret:
                _launch(w, a, b, s, flag)
            else:
                torch.ops.artaug.lora_merge_(w, a, b, s, flag)
        elif _merge_torch(w, a, b, s):
            overflowed.append(i)
    for f in flags.values():
        overflowed += [i for i, v in enumerate(f.tolist()) if v]
    if overflowed:
        raise LoRAMergeOverflowError(sorted(overflowed))


def lora_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`weight <- round(weight + scale * lora_B @ lora_A)` in place, fp32 accumulation and one
    round-to-nearest-even. weight `[out, in]`, lora_A `[r, in]`, lora_B `[out, r]`; any strides.
    Non-finite factors raise before anything is written; a result that becomes NaN or Inf
    raises `LoRAMergeOverflowError` AFTER the merge, with the non-finite values left in the
    weight (keep a copy to roll back)."""
    lora_merge_grouped_([weight], [[(lora_A, lora_B, scale)]])
    return weight


# ----------------------------------------------------------------------------------------
# references and accuracy figures
# ----------------------------------------------------------------------------------------

def lora_merge_reference(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         scale: float = 1.0) -> torch.Tensor:
    """The exact result in fp64 (not rounded): what the merge approximates."""
    return weight.double() + float(scale) * (lora_B.double() @ lora_A.double())


_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def rounding_stats(out: torch.Tensor, exact: torch.Tensor, weight: torch.Tensor | None = None) -> dict:
    """Compare a rounded result with the exact fp64 value.

    misrounded: fraction of elements where a neighbouring representable value (one bit
    pattern up or down) is strictly closer to the exact value than `out` is.
    max_ulp: largest |out - exact| in units of the dtype's spacing at |exact|. Where the
    delta nearly cancels the weight this exceeds 1 for ANY fp32-accumulating merge (the
    fp32 error of the delta is then larger than the tiny result's spacing), so
    max_ulp_operand measures it at max(|exact|, |weight|) too (weight: the original).
    """
    dtype = out.dtype
    bits = out.contiguous().view(_INT_VIEW[dtype])
    out64 = out.double()
    exact = exact.double().to(out.device)
    err = (out64 - exact).abs()
    closer = torch.zeros_like(err, dtype=torch.bool)
    for step in (1, -1):
        nb = (bits + step).view(dtype).double()
        closer |= (nb - exact).abs() < err
    finite = torch.isfinite(exact) & torch.isfinite(out64)
    n_bad = int((closer & finite).sum().item())
    info = torch.finfo(dtype)

    def max_ulps(mag: torch.Tensor) -> float:
        # spacing at mag: 2^(exponent - mantissa bits), floored at the subnormal spacing
        _, e = torch.frexp(mag.clamp_min(info.tiny))
        ulp = torch.ldexp(torch.ones_like(mag), (e - 1 - _MANTISSA[dtype]).to(torch.int32))
        ulp = ulp.clamp_min(info.smallest_normal * 2.0 ** -_MANTISSA[dtype])
        u = torch.where(finite, err / ulp, torch.zeros_like(err))
        return u.max().item() if u.numel() else 0.0

    mag = exact.abs()
    stats = {"n": out.numel(), "n_misrounded": n_bad, "misrounded": n_bad / max(1, out.numel()),
             "max_ulp": max_ulps(mag)}
    if weight is not None:
        stats["max_ulp_operand"] = max_ulps(torch.maximum(mag, weight.double().abs().to(mag.device)))
    return stats
