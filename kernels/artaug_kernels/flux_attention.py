"""Fused FLUX.1 attention: per-head QK-RMSNorm + RoPE + flash attention, one op.

DiffSynth's FLUX.1 blocks run attention as a chain of eager ops (view/transpose of the
fused qkv projection, four RMSNorms, three concats, fp32 RoPE, SDPA, transpose copy).
This op takes what the blocks already hold and returns what their output projections
read:

- ``qkv_txt`` ``[B, S_txt, 3*H*D]`` and ``qkv_img`` ``[B, S_img, 3*H*D]`` (joint blocks:
  the text and image projections; single blocks: ``qkv_txt=None`` and the strided qkv
  view of ``to_qkv_mlp``'s output). Any row/batch strides; the channel stride must be 1.
- four RMSNorm weights ``[D]`` (q/k of the text stream, q/k of the image stream);
- FLUX's RoPE table ``freqs [B or 1, 1, S, D/2, 2, 2]`` (text rows first), applied to
  adjacent channel pairs in fp32;
- returns ``[B, S_txt + S_img, H*D]``, text rows first.

Two launches: a pre-pass normalises + rotates k and packs k, v into ``[B, H, S, D]``
(k is read by every query tile, so doing it once is cheaper than in the inner loop);
the attention kernel normalises + rotates its q tile in the prologue (softmax scale and
log2(e) folded in, so the loop uses exp2) and runs an fp32 online softmax.

Interpreter notes (TRITON_INTERPRET=1, read once at import): bf16 is emulated in fp32
(values upcast after each load, matmul operands rounded to bf16 in fp32 with integer
ops, stores rounded explicitly), because the interpreter's bf16 arithmetic and its
fp32->bf16 casts are wrong. On the GPU the same code feeds bf16/fp16 tensor-core MMAs.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import triton
import triton.language as tl

from ._env import interpreter_mode

INTERPRET = interpreter_mode()  # read once, like Triton (kernels are decorated at import)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634

# Host-side launch counter: the op's real implementation runs at call time even inside
# a torch.compile graph, so this counts every kernel call (read by artaug_ext.patch).
STATS = {"launches": 0}

# K/V tiles through TMA descriptors; switched off (once, with a warning) if that path fails.
USE_TMA = {"enabled": os.environ.get("ARTAUG_TMA", "1") != "0"}
logger = logging.getLogger(__name__)

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _round_bf16_fp32(x):
    """fp32 -> nearest-even bf16 value, kept in fp32 (integer ops; the interpreter's
    own cast truncates). NaN/inf pass through unchanged."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) & 0xFFFF0000
    y = rounded.to(tl.float32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    return tl.where(finite, y, x)


@triton.jit
def _mma_operand(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """Cast an fp32 tile to the MMA operand type (emulated in fp32 in the interpreter)."""
    if EMULATE:
        if DTYPE == tl.bfloat16:
            return _round_bf16_fp32(x)
        elif DTYPE == tl.float16:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x
    else:
        return x.to(DTYPE)


@triton.jit
def _store(ptrs, x, mask, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """Store an fp32 tile as DTYPE, rounding to nearest even also in the interpreter."""
    if EMULATE and DTYPE == tl.bfloat16:
        bits = _round_bf16_fp32(x).to(tl.uint32, bitcast=True) >> 16
        tl.store(ptrs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, x.to(DTYPE), mask=mask)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if PREC == "ieee":
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _split_pairs(x, ROWS: tl.constexpr, HALF: tl.constexpr):
    """[ROWS, 2*HALF] -> even and odd channels, each [ROWS, HALF]."""
    return tl.split(tl.reshape(x, (ROWS, HALF, 2)))


@triton.jit
def _norm_rope_tile(
    txt_ptr, img_ptr, stride_tb, stride_ts, stride_ib, stride_is, col,
    w_even, w_odd, f00, f01, f10, f11,
    b, rows, S, S_txt, eps,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """RMSNorm(weight) + FLUX RoPE of one [ROWS, D] tile of q or k, in fp32.

    Rows below S_txt come from the text tensor, the rest from the image tensor. RoPE
    maps the channel pair (x0, x1) to (f00*x0 + f01*x1, f10*x0 + f11*x1); the pairs are
    split with reshape/split and re-interleaved with join (contiguous loads).
    `w_even`/`w_odd` are [ROWS, D/2] (already selected per row), f.. are [ROWS, D/2].
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    row_ok = rows < S
    row_ptr = tl.where(
        rows < S_txt,
        txt_ptr + b * stride_tb + rows * stride_ts,
        img_ptr + b * stride_ib + (rows - S_txt) * stride_is,
    ) + col
    x = tl.load(row_ptr[:, None] + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
    xe, xo = _split_pairs(x, ROWS, HALF)
    ne = xe * r[:, None] * w_even
    no = xo * r[:, None] * w_odd
    out = tl.join(f00 * ne + f01 * no, f10 * ne + f11 * no)
    return tl.reshape(out, (ROWS, HEAD_DIM))


@triton.jit
def _load_weights(w_txt_ptr, w_img_ptr, rows, S_txt, HEAD_DIM: tl.constexpr):
    """Norm weights split into even/odd channels and selected per row: [ROWS, D/2] each."""
    HALF: tl.constexpr = HEAD_DIM // 2
    h = tl.arange(0, HALF)
    is_txt = (rows < S_txt)[:, None]
    we = tl.where(is_txt, tl.load(w_txt_ptr + 2 * h).to(tl.float32)[None, :],
                  tl.load(w_img_ptr + 2 * h).to(tl.float32)[None, :])
    wo = tl.where(is_txt, tl.load(w_txt_ptr + 2 * h + 1).to(tl.float32)[None, :],
                  tl.load(w_img_ptr + 2 * h + 1).to(tl.float32)[None, :])
    return we, wo


@triton.jit
def _load_freqs(f_ptr, stride_fb, stride_fs, b, rows, S, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """FLUX RoPE table rows [ROWS, D/2, 2, 2] -> four [ROWS, D/2] coefficient tiles."""
    HALF: tl.constexpr = HEAD_DIM // 2
    c = tl.arange(0, 2 * HEAD_DIM)
    f = tl.load(f_ptr + b * stride_fb + rows[:, None] * stride_fs + c[None, :], mask=(rows < S)[:, None],
                other=0.0).to(tl.float32)
    f = tl.reshape(f, (ROWS, HALF, 2, 2))
    fc0, fc1 = tl.split(f)  # [ROWS, HALF, 2]: column 0 / 1 of each 2x2, indexed by output row
    f00, f10 = tl.split(fc0)
    f01, f11 = tl.split(fc1)
    return f00, f01, f10, f11


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _k_prepass_kernel(
    txt_ptr, img_ptr, stride_tb, stride_ts, stride_ib, stride_is,
    wk_txt_ptr, wk_img_ptr, f_ptr, stride_fb, stride_fs,
    k_out_ptr, v_out_ptr,
    H, S, S_txt, eps,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, DTYPE: tl.constexpr, EMULATE: tl.constexpr,
):
    """k <- RoPE(RMSNorm(k)), v copied; both packed to contiguous [B, H, S, D].

    One program per (row block, batch) loops over heads, so the RoPE table and the
    weights are read once per row block, not once per head.
    """
    pid_s = tl.program_id(0)
    # 64-bit batch offsets: one sample of a single block's qkv view spans S * 7 * H * D
    # elements (2048^2: 363M), so b * stride passes 2**31 from batch 6 on
    b = tl.program_id(1).to(tl.int64)
    rows = pid_s * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    row_ok = rows < S
    f00, f01, f10, f11 = _load_freqs(f_ptr, stride_fb, stride_fs, b, rows, S, BLOCK, HEAD_DIM)
    we, wo = _load_weights(wk_txt_ptr, wk_img_ptr, rows, S_txt, HEAD_DIM)
    v_row = tl.where(
        rows < S_txt,
        txt_ptr + b * stride_tb + rows * stride_ts,
        img_ptr + b * stride_ib + (rows - S_txt) * stride_is,
    )
    for h in range(H):
        k = _norm_rope_tile(
            txt_ptr, img_ptr, stride_tb, stride_ts, stride_ib, stride_is, (H + h) * HEAD_DIM,
            we, wo, f00, f01, f10, f11, b, rows, S, S_txt, eps, BLOCK, HEAD_DIM,
        )
        v = tl.load(v_row[:, None] + (2 * H + h) * HEAD_DIM + d[None, :], mask=row_ok[:, None], other=0.0)
        out_off = ((b * H + h).to(tl.int64) * S + rows)[:, None] * HEAD_DIM + d[None, :]
        _store(k_out_ptr + out_off, k, row_ok[:, None], DTYPE, EMULATE)
        tl.store(v_out_ptr + out_off, v, mask=row_ok[:, None])


@triton.jit
def _load_kv(src, row0, start_n, S, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr,
             MASK: tl.constexpr):
    """A [BLOCK_N, D] tile of the packed K or V buffer: TMA descriptor or plain pointers."""
    if TMA:
        return src.load([row0 + start_n, 0])
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ptrs = src + (row0 + offs_n).to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        if MASK:
            return tl.load(ptrs, mask=(offs_n < S)[:, None], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _attn_inner(
    acc, l_i, m_i, q, k_desc, v_desc, row0, start_n, S,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DTYPE: tl.constexpr,
    EMULATE: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr,
):
    """One K/V tile of the online softmax (exp2; the scale is already folded into q).
    K/V tiles come through TMA descriptors over the packed [B*H*S, D] buffers; a tail
    tile's rows past S belong to the next head (or are zero-filled) and are masked."""
    k = _load_kv(k_desc, row0, start_n, S, BLOCK_N, HEAD_DIM, TMA, MASK)
    if EMULATE:
        k = k.to(tl.float32)
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC)
    if MASK:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = tl.where((offs_n < S)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    v = _load_kv(v_desc, row0, start_n, S, BLOCK_N, HEAD_DIM, TMA, MASK)
    if EMULATE:
        v = v.to(tl.float32)
    acc = _dot(_mma_operand(p, DTYPE, EMULATE), v, acc, PREC)
    return acc, l_i, m_new


def _set_block_shapes(nargs):
    """Autotune pre-hook: the K/V descriptors' block shape follows BLOCK_N."""
    if nargs["TMA"]:
        block = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]
        nargs["k_desc"].block_shape = block
        nargs["v_desc"].block_shape = block


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1, pre_hook=_set_block_shapes)]
    out = []
    for bm, bn, warps, stages in [
        (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
        (128, 64, 8, 4), (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
    ]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages,
                                 pre_hook=_set_block_shapes))
    return out


# ARTAUG_AUTOTUNE=0 keeps one config per dtype (GPU tests: fewer compiles).
AUTOTUNE = os.environ.get("ARTAUG_AUTOTUNE", "1") != "0"


def _prune(configs, named_args, **kwargs):
    """fp32 (tests, not speed) gets small tiles only; without autotuning keep the first."""
    if named_args["out_ptr"].dtype == torch.float32:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64] or configs[:1]
    return configs if AUTOTUNE else configs[:1]


@triton.autotune(configs=_configs(), key=["S", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_fwd_kernel(
    txt_ptr, img_ptr, stride_tb, stride_ts, stride_ib, stride_is,
    wq_txt_ptr, wq_img_ptr, f_ptr, stride_fb, stride_fs,
    k_desc, v_desc, out_ptr, stride_ob, stride_os,
    H, S, S_txt, eps, qk_scale,
    HEAD_DIM: tl.constexpr, DTYPE: tl.constexpr, EMULATE: tl.constexpr, PREC: tl.constexpr,
    TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_M, D] query tile of one (batch, head): q prologue, then flash loop."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit batch offsets (see _k_prepass_kernel)
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    f00, f01, f10, f11 = _load_freqs(f_ptr, stride_fb, stride_fs, b, rows, S, BLOCK_M, HEAD_DIM)
    we, wo = _load_weights(wq_txt_ptr, wq_img_ptr, rows, S_txt, HEAD_DIM)
    q = _norm_rope_tile(
        txt_ptr, img_ptr, stride_tb, stride_ts, stride_ib, stride_is, h * HEAD_DIM,
        we, wo, f00, f01, f10, f11, b, rows, S, S_txt, eps, BLOCK_M, HEAD_DIM,
    )
    q = _mma_operand(q * qk_scale, DTYPE, EMULATE)

    row0 = pid_bh * S
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (S // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_desc, v_desc, row0, start_n, S,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, DTYPE, EMULATE, PREC, False, TMA)
    if n_full < S:
        acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_desc, v_desc, row0, n_full, S,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, DTYPE, EMULATE, PREC, True, TMA)
    acc = acc / l_i[:, None]
    o_ptrs = out_ptr + b * stride_ob + rows[:, None] * stride_os + h * HEAD_DIM + d[None, :]
    _store(o_ptrs, acc, (rows < S)[:, None], DTYPE, EMULATE)


# ----------------------------------------------------------------------------- host side


def _check(qkv_txt, qkv_img, weights, freqs, num_heads):
    if qkv_img.dim() != 3 or qkv_img.shape[-1] % (3 * num_heads):
        raise ValueError(f"flux_attention: qkv_img must be [B, S, 3*H*D], got {tuple(qkv_img.shape)}")
    B, S_img, C = qkv_img.shape
    D = C // (3 * num_heads)
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flux_attention: head_dim {D} not in {SUPPORTED_HEAD_DIMS}")
    if qkv_img.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flux_attention: dtype {qkv_img.dtype} not supported")
    S_txt = 0
    if qkv_txt is not None:
        if qkv_txt.dim() != 3 or qkv_txt.shape[0] != B or qkv_txt.shape[2] != C or qkv_txt.dtype != qkv_img.dtype:
            raise ValueError("flux_attention: qkv_txt must match qkv_img in batch, width and dtype")
        S_txt = qkv_txt.shape[1]
    S = S_txt + S_img
    for t in (qkv_img, qkv_txt):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("flux_attention: qkv channel stride must be 1")
    for w in weights:
        if w is not None and w.shape != (D,):
            raise ValueError(f"flux_attention: norm weights must be [{D}], got {tuple(w.shape)}")
    if freqs.dim() != 6 or tuple(freqs.shape[1:]) != (1, S, D // 2, 2, 2) or freqs.shape[0] not in (1, B):
        raise ValueError(f"flux_attention: freqs must be [B|1, 1, {S}, {D // 2}, 2, 2], got {tuple(freqs.shape)}")
    return B, S_txt, S_img, D


def _flux_attention_impl(qkv_txt, qkv_img, wq_txt, wk_txt, wq_img, wk_img, freqs, eps, num_heads):
    B, S_txt, S_img, D = _check(qkv_txt, qkv_img, (wq_txt, wk_txt, wq_img, wk_img), freqs, num_heads)
    if qkv_img.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("flux_attention: CPU tensors need TRITON_INTERPRET=1 set before artaug_kernels is imported")
    H, S = num_heads, S_txt + S_img
    dtype = qkv_img.dtype
    if qkv_txt is None:  # single block: no text stream; reuse the image pointers (never read)
        qkv_txt, wq_txt, wk_txt = qkv_img, wq_img, wk_img
    freqs = freqs.reshape(freqs.shape[0], S, 2 * D)
    if freqs.stride(-1) != 1:
        freqs = freqs.contiguous()
    stride_fb = freqs.stride(0) if freqs.shape[0] > 1 else 0
    k_buf = torch.empty((B * H * S, D), device=qkv_img.device, dtype=dtype)
    v_buf = torch.empty_like(k_buf)
    out = torch.empty((B, S, H * D), device=qkv_img.device, dtype=dtype)
    tl_dtype = _TL_DTYPE[dtype]
    emulate = INTERPRET
    prec = "ieee" if (dtype == torch.float32 or emulate) else "tf32"
    args = (qkv_txt, qkv_img, qkv_txt.stride(0), qkv_txt.stride(1), qkv_img.stride(0), qkv_img.stride(1))
    pre_block = 32 if (INTERPRET or dtype == torch.float32) else 64
    _k_prepass_kernel[(triton.cdiv(S, pre_block), B)](
        *args, wk_txt, wk_img, freqs, stride_fb, freqs.stride(1), k_buf, v_buf, H, S, S_txt, float(eps),
        HEAD_DIM=D, BLOCK=pre_block, DTYPE=tl_dtype, EMULATE=emulate, num_warps=4,
    )
    qk_scale = LOG2E / math.sqrt(D)

    def grid(meta):
        return (triton.cdiv(S, meta["BLOCK_M"]), B * H)

    def launch(tma):
        if tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            # block shapes are set per config by the autotune pre-hook
            k_src, v_src = TensorDescriptor.from_tensor(k_buf, [16, D]), TensorDescriptor.from_tensor(v_buf, [16, D])
        else:
            k_src, v_src = k_buf, v_buf
        _attn_fwd_kernel[grid](
            *args, wq_txt, wq_img, freqs, stride_fb, freqs.stride(1), k_src, v_src, out, out.stride(0), out.stride(1),
            H, S, S_txt, float(eps), qk_scale, HEAD_DIM=D, DTYPE=tl_dtype, EMULATE=emulate, PREC=prec, TMA=tma,
        )

    if USE_TMA["enabled"]:
        try:
            launch(True)
        except Exception as exc:  # noqa: BLE001 - e.g. a Triton without host TMA descriptors
            logger.warning("flux_attention: TMA path failed (%s: %s); using pointer loads from now on",
                           type(exc).__name__, str(exc)[:200])
            USE_TMA["enabled"] = False
            launch(False)
    else:
        launch(False)
    STATS["launches"] += 1
    return out


@torch.library.custom_op("artaug::flux_attention", mutates_args=())
def _flux_attention_op(
    qkv_txt: torch.Tensor | None,
    qkv_img: torch.Tensor,
    wq_txt: torch.Tensor | None,
    wk_txt: torch.Tensor | None,
    wq_img: torch.Tensor,
    wk_img: torch.Tensor,
    freqs: torch.Tensor,
    eps: float,
    num_heads: int,
) -> torch.Tensor:
    return _flux_attention_impl(qkv_txt, qkv_img, wq_txt, wk_txt, wq_img, wk_img, freqs, eps, num_heads)


@_flux_attention_op.register_fake
def _(qkv_txt, qkv_img, wq_txt, wk_txt, wq_img, wk_img, freqs, eps, num_heads):
    s_txt = 0 if qkv_txt is None else qkv_txt.shape[1]
    B, S_img, C = qkv_img.shape
    return qkv_img.new_empty((B, s_txt + S_img, C // 3))


def flux_attention(qkv_img, wq_img, wk_img, freqs, num_heads, eps=1e-6, qkv_txt=None, wq_txt=None, wk_txt=None):
    """Fused FLUX attention (see module docstring). Text stream optional (single blocks).

    Returns ``[B, S_txt + S_img, H*D]`` in the input dtype, text rows first.
    """
    if (qkv_txt is None) != (wq_txt is None) or (qkv_txt is None) != (wk_txt is None):
        raise ValueError("flux_attention: pass qkv_txt together with wq_txt and wk_txt")
    return _flux_attention_op(qkv_txt, qkv_img, wq_txt, wk_txt, wq_img, wk_img, freqs, float(eps), int(num_heads))


# ----------------------------------------------------------------------------- reference


def flux_attention_reference(qkv_img, wq_img, wk_img, freqs, num_heads, eps=1e-6, qkv_txt=None, wq_txt=None,
                             wk_txt=None, compute_dtype=None):
    """Plain-torch reference with the same math (RMSNorm -> weight -> RoPE -> softmax(qk^T/sqrt(D)) v),
    computed in ``compute_dtype`` (default: the input dtype promoted to fp32)."""
    cd = compute_dtype or torch.promote_types(qkv_img.dtype, torch.float32)

    def heads(qkv):
        B, S, C = qkv.shape
        D = C // (3 * num_heads)
        return qkv.to(cd).view(B, S, 3, num_heads, D).permute(2, 0, 3, 1, 4)  # [3, B, H, S, D]

    def norm(x, w):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w.to(cd)

    q_i, k_i, v_i = heads(qkv_img)
    q, k, v = norm(q_i, wq_img), norm(k_i, wk_img), v_i
    if qkv_txt is not None:
        q_t, k_t, v_t = heads(qkv_txt)
        q = torch.cat([norm(q_t, wq_txt), q], dim=2)
        k = torch.cat([norm(k_t, wk_txt), k], dim=2)
        v = torch.cat([v_t, v], dim=2)
    f = freqs.to(cd)

    def rope(x):
        x2 = x.reshape(*x.shape[:-1], -1, 1, 2)
        return (f[..., 0] * x2[..., 0] + f[..., 1] * x2[..., 1]).reshape(x.shape)

    q, k = rope(q), rope(k)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    o = att @ v
    B, H, S, D = o.shape
    return o.transpose(1, 2).reshape(B, S, H * D).to(qkv_img.dtype)
