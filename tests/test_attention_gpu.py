"""Compiled (GPU) checks of the fused FLUX attention kernel; skipped without CUDA.

Run on a GPU machine with `ARTAUG_TEST_GPU=1 python -m pytest tests/test_attention_gpu.py -q`.
"""

import math

import pytest
import torch
from test_attention_kernel import diffsynth_reference, make_inputs

pytestmark = pytest.mark.gpu


def _cuda(qkv_txt, qkv_img, ws, freqs):
    mv = (lambda t: None if t is None else t.cuda())
    return mv(qkv_txt), mv(qkv_img), [w.cuda() for w in ws], freqs.cuda()


def _kernel(qkv_txt, qkv_img, ws, freqs, heads):
    from artaug_kernels import flux_attention as fa

    if qkv_txt is None:
        return fa.flux_attention(qkv_img, ws[2], ws[3], freqs, heads)
    return fa.flux_attention(qkv_img, ws[2], ws[3], freqs, heads, qkv_txt=qkv_txt, wq_txt=ws[0], wk_txt=ws[1])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("s_txt,s_img,strided", [(7, 333, False), (0, 129, True), (512, 1024, False)])
def test_fp32_gpu_vs_fp64(head_dim, s_txt, s_img, strided):
    args = _cuda(*make_inputs(2, s_txt, s_img, head_dim, num_heads=3, strided=strided))
    out = _kernel(*args, 3)
    ref = diffsynth_reference(args[1], args[2][2:], args[3], 3, qkv_txt=args[0], w_txt=args[2][:2])
    assert (out.double() - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("s_txt,s_img", [(7, 333), (512, 1536)])
def test_low_precision_gpu_vs_diffsynth_error(dtype, head_dim, s_txt, s_img):
    """Mean error vs fp64 at most 1.1x that of DiffSynth's own chain in the same dtype."""
    args = _cuda(*make_inputs(2, s_txt, s_img, head_dim, num_heads=3, dtype=dtype, seed=3))
    out = _kernel(*args, 3)
    ref = diffsynth_reference(args[1], args[2][2:], args[3], 3, qkv_txt=args[0], w_txt=args[2][:2])
    ds = diffsynth_reference(args[1], args[2][2:], args[3], 3, qkv_txt=args[0], w_txt=args[2][:2], dtype=dtype)
    err = (out.double() - ref).abs()
    ds_err = (ds.double() - ref).abs()
    print(f"{dtype} D{head_dim} S{s_txt}+{s_img}: mean {err.mean():.3g} (diffsynth {ds_err.mean():.3g}), "
          f"max {err.max():.3g} (diffsynth {ds_err.max():.3g})")
    assert err.mean().item() <= 1.1 * ds_err.mean().item()
    assert err.max().item() <= 2.0 * ds_err.max().item()


def _psnr(a, b):
    mse = (a.double() - b.double()).square().mean().item()
    return 10 * math.log10(b.double().abs().max().item() ** 2 / mse) if mse > 0 else float("inf")


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_patched_tiny_dit_bf16_cuda(compile_blocks):
    from test_patch_kernels import dit_inputs, run_dit, tiny_dit

    from artaug_ext import patch

    dit32 = tiny_dit().cuda()
    inputs = {k: v.cuda() for k, v in dit_inputs(batch=2, s_txt=9, size=24).items()}
    ref32 = run_dit(dit32, inputs)
    dit = tiny_dit().cuda().to(torch.bfloat16)
    inputs16 = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    base = run_dit(dit, inputs16)
    if compile_blocks:
        torch._dynamo.reset()
        for m in dit.modules():
            if type(m).__name__ in dit._repeated_blocks:
                m.compile(dynamic=True)
    patch.reset_kernel_stats()
    patch.apply_kernels(dit)
    out = run_dit(dit, inputs16)
    stats = patch.kernel_stats()
    patch.remove_kernels(dit)
    assert stats["kernel"] >= 6 and stats["fallbacks"] == 0, stats
    rel = ((out.double() - ref32).norm() / ref32.norm()).item()
    base_rel = ((base.double() - ref32).norm() / ref32.norm()).item()
    print(f"compile={compile_blocks}: rel err vs fp32 {rel:.3g} (diffsynth bf16 {base_rel:.3g}), "
          f"psnr vs diffsynth bf16 {_psnr(out, base):.1f} dB")
    assert rel <= 1.1 * base_rel + 1e-3
    if compile_blocks:
        torch._dynamo.reset()


def test_pointer_path_gpu(monkeypatch):
    from artaug_kernels import flux_attention as fa

    print(f"TMA K/V path enabled: {fa.USE_TMA['enabled']}")
    monkeypatch.setitem(fa.USE_TMA, "enabled", False)
    args = _cuda(*make_inputs(1, 7, 333, 128, num_heads=3, dtype=torch.bfloat16, seed=5))
    out = _kernel(*args, 3)
    ref = diffsynth_reference(args[1], args[2][2:], args[3], 3, qkv_txt=args[0], w_txt=args[2][:2])
    assert (out.double() - ref).abs().max().item() < 3e-2
