"""Fused FLUX attention kernel vs an fp64 reference built from DiffSynth's own modules.

Runs the Triton kernel through the interpreter on CPU (conftest sets TRITON_INTERPRET=1);
shapes are tiny and lengths odd so masked tails, tiles straddling the text/image border
and single-row sequences are all exercised.
"""

import pytest
import torch
import torch.nn.functional as F
from artaug_kernels import flux_attention as fa
from diffsynth.models.flux_dit import FluxJointAttention, RoPEEmbedding
from diffsynth.models.general_modules import RMSNorm

AXES = {64: [8, 28, 28], 128: [16, 56, 56]}


def make_freqs(batch, s_txt, s_img, head_dim, width=11):
    """DiffSynth's RoPE table for text ids (all zero) followed by an image grid."""
    txt_ids = torch.zeros(batch, s_txt, 3)
    idx = torch.arange(s_img)
    img_ids = torch.stack([torch.zeros(s_img), (idx // width).float(), (idx % width).float()], dim=-1)
    img_ids = img_ids[None].repeat(batch, 1, 1) + torch.arange(batch).view(batch, 1, 1)  # differ per batch
    rope = RoPEEmbedding(head_dim * 2, 10000, AXES[head_dim])
    return rope(torch.cat([txt_ids, img_ids], dim=1))


def diffsynth_reference(qkv_img, w_img, freqs, num_heads, qkv_txt=None, w_txt=None, eps=1e-6, dtype=torch.float64):
    """DiffSynth's chain (view/transpose/chunk, RMSNorm modules, concat, apply_rope, SDPA) in `dtype`."""

    def split(qkv, wq, wk):
        B, S, C = qkv.shape
        D = C // (3 * num_heads)
        x = qkv.to(dtype).reshape(B, S, 3 * num_heads, D).transpose(1, 2)
        q, k, v = x.chunk(3, dim=1)
        nq, nk = RMSNorm(D, eps).to(qkv.device, dtype), RMSNorm(D, eps).to(qkv.device, dtype)
        nq.weight.data.copy_(wq)
        nk.weight.data.copy_(wk)
        return nq(q), nk(k), v

    with torch.no_grad():
        q, k, v = split(qkv_img, *w_img)
        if qkv_txt is not None:
            qt, kt, vt = split(qkv_txt, *w_txt)
            q, k, v = torch.cat([qt, q], 2), torch.cat([kt, k], 2), torch.cat([vt, v], 2)
        q, k = FluxJointAttention.apply_rope(None, q, k, freqs.to(dtype))
        o = F.scaled_dot_product_attention(q, k, v)
        B, H, S, D = o.shape
        return o.transpose(1, 2).reshape(B, S, H * D)


def make_inputs(batch, s_txt, s_img, head_dim, num_heads=2, dtype=torch.float32, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = 3 * num_heads * head_dim
    if strided:  # like to_qkv_mlp's output sliced to its qkv part, and a batch-strided text view
        qkv_img = torch.randn(batch, s_img, 7 * width // 3, generator=g)[:, :, :width]
        qkv_txt = torch.randn(2 * batch, s_txt, width, generator=g)[::2] if s_txt else None
    else:
        qkv_img = torch.randn(batch, s_img, width, generator=g)
        qkv_txt = torch.randn(batch, s_txt, width, generator=g) if s_txt else None
    qkv_img = qkv_img.to(dtype)
    qkv_txt = qkv_txt.to(dtype) if qkv_txt is not None else None
    ws = [(0.5 + torch.rand(head_dim, generator=g)).to(dtype) for _ in range(4)]
    freqs = make_freqs(batch, s_txt, s_img, head_dim)
    return qkv_txt, qkv_img, ws, freqs


def run_kernel(qkv_txt, qkv_img, ws, freqs, num_heads=2):
    if qkv_txt is None:
        return fa.flux_attention(qkv_img, ws[2], ws[3], freqs, num_heads)
    return fa.flux_attention(qkv_img, ws[2], ws[3], freqs, num_heads, qkv_txt=qkv_txt, wq_txt=ws[0], wk_txt=ws[1])


def reference64(qkv_txt, qkv_img, ws, freqs, num_heads=2):
    return diffsynth_reference(qkv_img, ws[2:], freqs, num_heads, qkv_txt=qkv_txt, w_txt=ws[:2])


CASES = [  # (batch, s_txt, s_img, head_dim, strided)
    (2, 7, 77, 64, False),
    (1, 1, 129, 64, True),
    (2, 7, 1, 64, True),
    (1, 0, 129, 64, True),  # single-block layout: no text stream
    (2, 1, 77, 128, False),
    (1, 7, 1, 128, True),
]


@pytest.mark.parametrize("batch,s_txt,s_img,head_dim,strided", CASES)
def test_fp32_matches_fp64_reference(batch, s_txt, s_img, head_dim, strided):
    qkv_txt, qkv_img, ws, freqs = make_inputs(batch, s_txt, s_img, head_dim, strided=strided)
    if strided and s_img > 1:
        assert not qkv_img.is_contiguous()
    out = run_kernel(qkv_txt, qkv_img, ws, freqs)
    ref = reference64(qkv_txt, qkv_img, ws, freqs)
    assert out.shape == (batch, s_txt + s_img, 2 * head_dim) and out.dtype == torch.float32
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-4, err


def test_plain_reference_matches_diffsynth_chain():
    qkv_txt, qkv_img, ws, freqs = make_inputs(2, 7, 33, 64)
    ref = reference64(qkv_txt, qkv_img, ws, freqs)
    ours = fa.flux_attention_reference(qkv_img.double(), ws[2].double(), ws[3].double(), freqs.double(), 2,
                                       qkv_txt=qkv_txt.double(), wq_txt=ws[0].double(), wk_txt=ws[1].double())
    assert (ours - ref).abs().max().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,s_txt,s_img,head_dim", [(2, 7, 77, 64), (1, 1, 40, 128)])
def test_low_precision_within_noise(dtype, batch, s_txt, s_img, head_dim):
    """bf16/fp16: error vs fp64 no worse than DiffSynth's own chain run in that dtype."""
    qkv_txt, qkv_img, ws, freqs = make_inputs(batch, s_txt, s_img, head_dim, dtype=dtype, seed=1)
    out = run_kernel(qkv_txt, qkv_img, ws, freqs)
    assert out.dtype == dtype
    ref = reference64(qkv_txt, qkv_img, ws, freqs)
    ds = diffsynth_reference(qkv_img, ws[2:], freqs, 2, qkv_txt=qkv_txt, w_txt=ws[:2], dtype=dtype)
    err = (out.double() - ref).abs().max().item()
    ds_err = (ds.double() - ref).abs().max().item()
    mean_err = (out.double() - ref).abs().mean().item()
    ds_mean = (ds.double() - ref).abs().mean().item()
    # within the dtype's noise: P is rounded to bf16/fp16 for the MMA as on the GPU, which
    # DiffSynth's CPU chain does not do, so allow some headroom on the max
    assert mean_err <= 1.1 * ds_mean, (mean_err, ds_mean)
    assert err <= 1.5 * ds_err + 1e-3, (err, ds_err)
    assert err < (2e-2 if dtype == torch.bfloat16 else 4e-3), err


def test_broadcast_freqs_and_errors():
    qkv_txt, qkv_img, ws, freqs = make_inputs(2, 1, 17, 64)
    freqs1 = freqs[:1]
    out = run_kernel(qkv_txt, qkv_img, ws, freqs1)
    ref = reference64(qkv_txt, qkv_img, ws, freqs1.expand(2, *freqs1.shape[1:]))
    assert (out.double() - ref).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="freqs"):
        run_kernel(qkv_txt, qkv_img, ws, freqs[:, :, :-1])
    bad = torch.randn(1, 5, 3 * 2 * 32)
    with pytest.raises(ValueError, match="head_dim"):
        fa.flux_attention(bad, torch.ones(32), torch.ones(32), freqs[:1, :, :5, :16], 2)


def test_fake_impl_and_compile_keep_op_in_graph():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qkv_txt, qkv_img, ws, freqs = make_inputs(1, 3, 20, 64)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in (qkv_txt, qkv_img, *ws, freqs)]
        out = run_kernel(args[0], args[1], args[2:6], args[6])
        assert out.shape == (1, 23, 128)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda *a: run_kernel(a[0], a[1], a[2:6], a[6]) * 2, backend=backend, fullgraph=True)
    before = fa.STATS["launches"]
    got = fn(qkv_txt, qkv_img, *ws, freqs)
    assert fa.STATS["launches"] == before + 1
    assert any("artaug.flux_attention" in str(n.target) for g in graphs for n in g.graph.nodes)
    ref = reference64(qkv_txt, qkv_img, ws, freqs)
    assert (got.double() - 2 * ref).abs().max().item() <= 2e-4


def test_pointer_path_matches(monkeypatch):
    """The non-TMA K/V path (used if a Triton lacks host descriptors) gives the same result."""
    qkv_txt, qkv_img, ws, freqs = make_inputs(2, 7, 40, 64, strided=True)
    ref = reference64(qkv_txt, qkv_img, ws, freqs)
    monkeypatch.setitem(fa.USE_TMA, "enabled", False)
    out = run_kernel(qkv_txt, qkv_img, ws, freqs)
    assert (out.double() - ref).abs().max().item() <= 1e-4
