"""apply_kernels / remove_kernels on DiffSynth's FLUX.1 blocks (CPU, Triton interpreter).

The patched tiny DiT runs through DiffSynth's real `model_fn_flux_image`; the kernel
launch counter must move, so a test cannot pass on the fallback alone.
"""

import math
import types

import pytest
import torch
from artaug_kernels import flux_attention as fa
from diffsynth.models.flux_dit import FluxJointTransformerBlock, FluxSingleTransformerBlock, RoPEEmbedding
from diffsynth.pipelines.flux_image import model_fn_flux_image

from artaug_ext import patch
from artaug_ext.tiny.models import TinyFluxDiT


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    return TinyFluxDiT(dim=128, num_heads=2, num_joint_blocks=2, num_single_blocks=4).eval()


def dit_inputs(batch=1, s_txt=7, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(batch, 16, size, size, generator=g),
        timestep=torch.full((batch,), 500.0),
        prompt_emb=torch.randn(batch, s_txt, 64, generator=g),
        pooled_prompt_emb=torch.randn(batch, 32, generator=g),
        guidance=torch.full((batch,), 3.5),
        text_ids=torch.zeros(batch, s_txt, 3),
    )


def run_dit(dit, inputs):
    with torch.no_grad():
        return model_fn_flux_image(dit=dit, **inputs)


def psnr(a, b):
    mse = (a.double() - b.double()).square().mean().item()
    peak = b.double().abs().max().item()
    return 10 * math.log10(peak * peak / mse) if mse > 0 else float("inf")


@pytest.fixture(autouse=True)
def _clean_stats():
    patch.reset_kernel_stats()
    yield


def test_patched_tiny_dit_matches_unpatched_and_restores_exactly():
    dit = tiny_dit()
    inputs = dit_inputs(batch=2, s_txt=7, size=12)  # 36 image tokens + 7 text
    ref = run_dit(dit, inputs)
    assert patch.apply_kernels(dit) == 2 + 4
    assert patch.apply_kernels(dit) == 0  # idempotent
    out = run_dit(dit, inputs)
    stats = patch.kernel_stats()
    assert stats["kernel"] == 6 and stats["fallbacks"] == 0, stats
    value = psnr(out, ref)
    assert value >= 40, value
    assert (out - ref).abs().max().item() < 1e-3
    assert patch.remove_kernels(dit) == 6
    for m in dit.modules():
        assert "forward" not in m.__dict__ and "process_attention" not in m.__dict__
    again = run_dit(dit, inputs)
    assert torch.equal(again, ref)
    assert patch.kernel_stats()["kernel"] == 6


def test_pipeline_like_target_and_head_dim_128():
    torch.manual_seed(0)
    joint = FluxJointTransformerBlock(256, 2).eval()
    single = FluxSingleTransformerBlock(256, 2).eval()
    holder = types.SimpleNamespace(dit=torch.nn.ModuleList([joint]), controlnet=torch.nn.ModuleList([single]))
    s_txt, s_img = 3, 21
    ids = torch.cat([torch.zeros(1, s_txt, 3), torch.randint(0, 9, (1, s_img, 3)).float()], dim=1)
    freqs = RoPEEmbedding(256, 10000, [16, 56, 56])(ids)
    a, b, temb = torch.randn(1, s_img, 256), torch.randn(1, s_txt, 256), torch.randn(1, 256)
    with torch.no_grad():
        ref_j = joint(a, b, temb, freqs)
        ref_s = single(torch.cat([b, a], 1), b, temb, freqs)
        assert patch.apply_kernels(holder) == 2
        out_j = joint(a, b, temb, freqs)
        out_s = single(torch.cat([b, a], 1), b, temb, freqs)
    assert patch.kernel_stats()["kernel"] == 2
    for o, r in zip(out_j + out_s, ref_j + ref_s, strict=True):
        assert (o - r).abs().max().item() < 1e-4
    assert patch.remove_kernels(holder) == 2


def _joint_block_and_args(dim=128, heads=2, s_txt=3, s_img=10, dtype=torch.float32):
    torch.manual_seed(0)
    block = FluxJointTransformerBlock(dim, heads).eval().to(dtype)
    hd = dim // heads
    axes = {64: [8, 28, 28], 32: [8, 12, 12]}[hd]
    ids = torch.cat([torch.zeros(1, s_txt, 3), torch.randint(0, 9, (1, s_img, 3)).float()], dim=1)
    freqs = RoPEEmbedding(dim, 10000, axes)(ids)
    a = torch.randn(1, s_img, dim, dtype=dtype)
    b = torch.randn(1, s_txt, dim, dtype=dtype)
    return block, (a, b, freqs)


def _fallback_once(module_call, reason):
    patch.reset_kernel_stats()
    out = module_call()
    stats = patch.kernel_stats()
    assert stats["fallback"] == {reason: 1} and stats["kernel"] == 0, stats
    return out


def test_every_fallback_reason(monkeypatch):
    from diffsynth.core.vram.layers import AutoWrappedLinear

    block, (a, b, freqs) = _joint_block_and_args()
    attn = block.attn
    s = a.shape[1] + b.shape[1]
    patch.apply_kernels(block)
    with torch.no_grad():
        ref = attn(a, b, freqs)

        mask = torch.zeros(1, 1, s, s)
        got = _fallback_once(lambda: attn(a, b, freqs, attn_mask=mask), "attn_mask")
        assert torch.allclose(got[0], ref[0], atol=1e-4)

        ip = dict(ip_k=torch.randn(1, 2, 4, 64), ip_v=torch.randn(1, 2, 4, 64), scale=0.0)
        got = _fallback_once(lambda: attn(a, b, freqs, ipadapter_kwargs_list=ip), "ipadapter")
        assert torch.allclose(got[0], ref[0], atol=1e-4)

        attn.norm_q_a.eps = 1e-5
        _fallback_once(lambda: attn(a, b, freqs), "unsupported")
        attn.norm_q_a.eps = 1e-6

        # a RoPE table the kernel does not take (batch 3 for batch 1): DiffSynth's own code decides
        patch.reset_kernel_stats()
        with pytest.raises(RuntimeError):
            attn(a, b, freqs.repeat(3, 1, 1, 1, 1, 1))
        assert patch.kernel_stats()["fallback"] == {"rope": 1}

        monkeypatch.setattr(fa, "INTERPRET", False)
        got = _fallback_once(lambda: attn(a, b, freqs), "device")
        assert torch.allclose(got[0], ref[0], atol=1e-4)
        monkeypatch.setattr(fa, "INTERPRET", True)

        original = attn.a_to_qkv
        attn.a_to_qkv = AutoWrappedLinear(original, offload_dtype=torch.float32, offload_device="cpu",
                                          onload_dtype=torch.float32, onload_device="cpu",
                                          preparing_dtype=torch.float32, preparing_device="cpu",
                                          computation_dtype=torch.float32, computation_device="cpu")
        got = _fallback_once(lambda: attn(a, b, freqs), "vram_managed")
        attn.a_to_qkv = original
        assert torch.allclose(got[0], ref[0], atol=1e-4)

    # autograd: grad enabled and parameters that require grad
    got = _fallback_once(lambda: attn(a, b, freqs), "autograd")
    got[0].sum().backward()
    assert attn.a_to_qkv.weight.grad is not None

    # dtype: float64 block
    block64, (a64, b64, f64) = _joint_block_and_args(dtype=torch.float64)
    patch.apply_kernels(block64)
    with torch.no_grad():
        _fallback_once(lambda: block64.attn(a64, b64, f64), "dtype")

    # head_dim 32
    block32, (a32, b32, f32) = _joint_block_and_args(dim=64)
    patch.apply_kernels(block32)
    with torch.no_grad():
        _fallback_once(lambda: block32.attn(a32, b32, f32), "head_dim")


def test_single_block_fallbacks_and_kernel():
    torch.manual_seed(0)
    single = FluxSingleTransformerBlock(128, 2).eval()
    s = 12
    ids = torch.randint(0, 9, (1, s, 3)).float()
    freqs = RoPEEmbedding(128, 10000, [8, 28, 28])(ids)
    x, temb = torch.randn(1, s, 128), torch.randn(1, 128)
    with torch.no_grad():
        ref = single(x, None, temb, freqs)[0]
        patch.apply_kernels(single)
        out = single(x, None, temb, freqs)[0]
        assert patch.kernel_stats()["kernel"] == 1
        assert (out - ref).abs().max().item() < 1e-4
        mask = torch.zeros(1, 1, s, s)
        got = _fallback_once(lambda: single(x, None, temb, freqs, attn_mask=mask)[0], "attn_mask")
        assert torch.allclose(got, ref, atol=1e-5)


def test_refuses_changed_diffsynth(monkeypatch):
    from diffsynth.models.flux_dit import FluxJointAttention

    def forward(self, hidden_states_a, hidden_states_b, image_rotary_emb, attn_mask=None, ipadapter_kwargs_list=None):
        return hidden_states_a

    monkeypatch.setattr(FluxJointAttention, "forward", forward)
    with pytest.raises(patch.KernelPatchError, match="FluxJointAttention.forward"):
        patch.apply_kernels(tiny_dit())


def test_works_with_compiled_blocks():
    """Regional compilation as `pipe.compile_pipeline()` does it (backend 'eager' on CPU):
    patching after compiling re-traces, removing restores DiffSynth's path."""
    torch._dynamo.reset()
    dit = TinyFluxDiT(dim=128, num_heads=2, num_joint_blocks=1, num_single_blocks=1).eval()
    inputs = dit_inputs(batch=1, s_txt=5, size=8)
    ref = run_dit(dit, inputs)
    for m in dit.modules():
        if type(m).__name__ in dit._repeated_blocks:
            m.compile(backend="eager", dynamic=True)
    compiled_ref = run_dit(dit, inputs)
    assert torch.allclose(compiled_ref, ref, atol=1e-5)
    patch.apply_kernels(dit)
    out = run_dit(dit, inputs)
    assert patch.kernel_stats()["kernel"] == 2
    assert psnr(out, ref) >= 40
    patch.remove_kernels(dit)
    again = run_dit(dit, inputs)
    assert patch.kernel_stats()["kernel"] == 2
    assert torch.allclose(again, ref, atol=1e-5)
    torch._dynamo.reset()
