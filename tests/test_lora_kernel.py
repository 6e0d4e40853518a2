"""The merge kernel against fp64: interpreter (TRITON_INTERPRET=1, set by conftest), the torch
path, and (marked gpu) the compiled kernel."""

import artaug_kernels
import numpy as np
import pytest
import torch
from artaug_kernels import lora_merge as lm

SHAPES = [(1, 1, 1), (33, 65, 3), (130, 257, 17), (3072, 77, 8), (130, 257, 256), (64, 48, 300)]
SCALES = [1.0, -0.75, 0.0, 2.5]


def make(m, n, r, wdtype=torch.bfloat16, fdtype=torch.bfloat16, seed=0, rel=0.1, device="cpu", scale=1.0):
    """Weights like a DiT's (std 0.02), a delta of about `rel` of that (a strong LoRA: fp32
    accumulation mis-rounds about sqrt(r) * 2^-16 * rel of the elements, so rel=0.1 keeps
    rank 256 within the 1e-4 figure)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(m, n, generator=g) * 0.02).to(wdtype)
    a = (torch.randn(r, n, generator=g) / r ** 0.25).to(fdtype)
    b = (torch.randn(m, r, generator=g) * 0.02 * rel / r ** 0.25 / max(abs(scale), 1.0)).to(fdtype)
    return w.to(device), a.to(device), b.to(device)


def check(w_before, w_after, a, b, scale, tol=1e-4):
    ref = lm.lora_merge_reference(w_before, a, b, scale)
    st = lm.rounding_stats(w_after, ref, w_before)
    # a rate of 1e-4 cannot be judged on a few thousand elements: allow one there
    assert st["n_misrounded"] <= max(tol * st["n"], 1), st
    assert st["max_ulp_operand"] <= 1.0, st
    return st


@pytest.fixture(params=["interpreter", "torch"])
def path(request, monkeypatch):
    """Run the public API through the interpreter kernel or the plain-torch path."""
    if request.param == "torch":
        monkeypatch.setattr(lm, "interpreter_mode", lambda: False)
    else:
        assert lm.interpreter_mode(), "conftest should run the kernels in the interpreter"
    return request.param


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_bf16_against_fp64(path, m, n, r):
    if path == "interpreter" and m * n * r > 3072 * 77 * 8:
        pytest.skip("large for the interpreter; the torch path covers it")
    for i, scale in enumerate(SCALES):
        w, a, b = make(m, n, r, seed=i, scale=scale)
        before = w.clone()
        artaug_kernels.lora_merge_(w, a, b, scale)
        check(before, w, a, b, scale)
        if scale == 0.0:
            assert torch.equal(w, before)


@pytest.mark.parametrize("wdtype,fdtype", [(torch.float16, torch.float16), (torch.float32, torch.float32),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_other_dtypes(path, wdtype, fdtype):
    w, a, b = make(130, 257, 17, wdtype, fdtype, scale=1.3)
    before = w.clone()
    artaug_kernels.lora_merge_(w, a, b, -1.3)
    ref = lm.lora_merge_reference(before, a, b, -1.3)
    st = lm.rounding_stats(w, ref, before)
    if wdtype == torch.float32:
        # fp32 accumulation cannot round fp32 exactly; the error stays at the fp32 level
        assert (w.double() - ref).abs().max() < 1e-6
    else:
        # the 1e-4 figure is for bf16; fp16 keeps 3 more bits, so fp32 accumulation shows 8x more
        limit = 1e-4 if wdtype == torch.bfloat16 else 1e-3
        assert st["misrounded"] <= limit and st["max_ulp_operand"] <= 1.0, st


def test_non_contiguous(path):
    w_full, a_full, b_full = make(96, 130, 40)
    w = w_full.T  # [130, 96], strides (1, 130)
    a = torch.cat([a_full, a_full], dim=1)[:20, ::2][:, :96]  # [20, 96] strided
    b = (torch.randn(20, 130) * 0.0005).to(torch.bfloat16).T  # [130, 20], strides (1, 130)
    before = w.clone()
    artaug_kernels.lora_merge_(w, a, b, 0.9)
    check(before, w, a, b, 0.9)
    # row slice of a fused weight: the rest is untouched
    w2, a2, b2 = make(90, 40, 4)
    orig = w2.clone()
    artaug_kernels.lora_merge_(w2[30:60], a2, b2[:30], 1.0)
    assert torch.equal(w2[:30], orig[:30]) and torch.equal(w2[60:], orig[60:])
    check(orig[30:60], w2[30:60], a2, b2[:30], 1.0)


def test_grouped_several_loras(path):
    layers = [make(33, 65, 3, seed=1), make(70, 40, 16, seed=2), make(1, 1, 1, seed=3)]
    extra = make(33, 65, 5, seed=4)
    weights = [x[0] for x in layers]
    before = [w.clone() for w in weights]
    factors = [[(layers[0][1], layers[0][2], 0.5), (extra[1], extra[2], -2.0)],
               [(layers[1][1], layers[1][2], 1.0)], [(layers[2][1], layers[2][2], 3.0)]]
    artaug_kernels.lora_merge_grouped_(weights, factors)
    for w, w0, fs in zip(weights, before, factors, strict=True):
        ref = w0.double()
        for a, b, s in fs:
            ref = ref + s * (b.double() @ a.double())
        st = lm.rounding_stats(w, ref, w0)
        assert st["misrounded"] <= 1e-4 and st["max_ulp_operand"] <= 1.0, st


def test_bad_inputs(path):
    w, a, b = make(33, 65, 3)
    before = w.clone()
    bad_b = b.clone()
    bad_b[3, 1] = float("nan")
    w2, a2, b2 = make(20, 20, 2)
    before2 = w2.clone()
    with pytest.raises(ValueError, match="non-finite"):
        # the good layer comes first: still nothing may be written
        artaug_kernels.lora_merge_grouped_([w2, w], [[(a2, b2, 1.0)], [(a, bad_b, 1.0)]])
    assert torch.equal(w, before) and torch.equal(w2, before2)
    with pytest.raises(ValueError, match="scale"):
        artaug_kernels.lora_merge_(w, a, b, float("inf"))
    with pytest.raises(ValueError, match="shape mismatch"):
        artaug_kernels.lora_merge_(w, a[:, :10], b)
    with pytest.raises(TypeError):
        artaug_kernels.lora_merge_(w.to(torch.int32), a, b)
    assert torch.equal(w, before)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_overflow_detected(path):
    w = torch.full((16, 16), 3.0e38, dtype=torch.bfloat16)
    a = torch.ones(1, 16, dtype=torch.bfloat16)
    b = torch.ones(16, 1, dtype=torch.bfloat16) * 1e38
    with pytest.raises(artaug_kernels.LoRAMergeOverflowError) as e:
        artaug_kernels.lora_merge_grouped_([torch.zeros(4, 16, dtype=torch.bfloat16), w],
                                           [[(a, b[:4], 1.0)], [(a, b, 1.0)]])
    assert e.value.layers == [1]


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("dtype,w0,delta", [(torch.float16, 60000.0, 6000.0),
                                            (torch.bfloat16, 3.3895e38, 1e36)])
def test_overflow_on_rounding_detected(path, dtype, w0, delta):
    """w + delta is finite in fp32 but rounds to Inf in the weight's dtype: still an overflow."""
    w = torch.full((8, 8), w0, dtype=dtype)
    a = torch.ones(1, 8, dtype=dtype)
    b = torch.full((8, 1), delta, dtype=dtype)
    assert torch.isfinite(w.float() + delta).all() and torch.isinf((w.float() + delta).to(dtype)).all()
    with pytest.raises(artaug_kernels.LoRAMergeOverflowError) as e:
        artaug_kernels.lora_merge_(w, a, b, 1.0)
    assert e.value.layers == [0]
    # just below the threshold: no error, and the result is finite
    w = torch.full((8, 8), w0, dtype=dtype)
    artaug_kernels.lora_merge_(w, a, torch.zeros(8, 1, dtype=dtype), 1.0)
    assert torch.isfinite(w).all()


def test_rounding_stats_is_exact():
    """The accuracy figure itself: a brute-force check on fp16 against every candidate."""
    exact = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    # numpy rounds fp64 -> fp16 directly to nearest; torch goes through fp32 (double
    # rounding), which mis-rounds about one value in 15000
    rounded = torch.from_numpy(exact.numpy().astype(np.float16))
    assert lm.rounding_stats(rounded, exact)["n_misrounded"] == 0
    bumped = (rounded.view(torch.int16) + 1).view(torch.float16)
    assert lm.rounding_stats(bumped, exact)["misrounded"] > 0.99


def test_figures_rank_sweep(path):
    """The issue's figure: mis-rounded fraction <= 1e-4 and <= 1 ulp, ranks 1..256."""
    shape = (512, 384)
    for r in (1, 4, 16, 64, 256):
        w, a, b = make(*shape, r, seed=r)
        before = w.clone()
        artaug_kernels.lora_merge_(w, a, b, 1.0)
        check(before, w, a, b, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,r", [(1, 1, 1), (33, 65, 3), (3072, 77, 8), (130, 257, 256),
                                   (3072, 3072, 64), (9216, 3072, 16), (3072, 15360, 512)])
@pytest.mark.parametrize("wdtype,fdtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float16)])
def test_gpu_compiled(m, n, r, wdtype, fdtype):
    w, a, b = make(m, n, r, wdtype, fdtype, device="cuda", scale=0.8)
    before = w.clone()
    artaug_kernels.lora_merge_(w, a, b, -0.8)
    check(before.cpu(), w.cpu(), a.cpu(), b.cpu(), -0.8)


@pytest.mark.gpu
def test_gpu_custom_op_compiles():
    w, a, b = make(256, 128, 16, device="cuda")
    before = w.clone()
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")

    @torch.compile(fullgraph=True)
    def f(w, a, b, flag):
        torch.ops.artaug.lora_merge_(w, a, b, 1.0, flag)
        return w

    f(w, a, b, flag)
    check(before.cpu(), w.cpu(), a.cpu(), b.cpu(), 1.0)


def test_interpreter_switch_parsed_like_triton(monkeypatch):
    """Both kernels and the CLI read TRITON_INTERPRET as Triton does, so their CPU dispatch
    and bf16 work-arounds switch on exactly when Triton's interpreter does."""
    from triton import knobs

    for value in ("1", "true", "TRUE", "yes", "on", "y", "0", "false", "off", "2", ""):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert artaug_kernels.interpreter_mode() == bool(knobs.runtime.interpret), value
