"""FLUX attention: fused Triton kernel vs DiffSynth's eager chain (each SDPA backend, FA3)
and the chain under torch.compile with cuDNN SDPA.

The chain is DiffSynth's own `FluxJointAttention.forward` with identity projections, so
exactly the ops between the qkv projections and the output projections are timed:
view/transpose, four RMSNorms, three concats, fp32 RoPE, SDPA, transpose/reshape.
Shapes: B1 H24 D128, 512 text tokens, S = 1536 / 4608 / 16896 (512^2, 1024^2, 2048^2).

    python benchmarks/bench_attention.py --out benchmarks/results/attention.json
    python benchmarks/bench_attention.py --out /tmp/a.json --dry-run   # CPU, interpreter, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _flops(batch, heads, seq, head_dim):
    return 4.0 * batch * heads * seq * seq * head_dim


def _chain_module(heads, head_dim, dtype, device):
    import torch
    from diffsynth.models.flux_dit import FluxJointAttention

    dim = heads * head_dim
    m = FluxJointAttention(dim, dim, heads, head_dim)
    for name in ("a_to_qkv", "b_to_qkv", "a_to_out", "b_to_out"):
        setattr(m, name, torch.nn.Identity())
    with torch.no_grad():
        for norm in (m.norm_q_a, m.norm_k_a, m.norm_q_b, m.norm_k_b):
            norm.weight.uniform_(0.5, 1.5)
    return m.to(device=device, dtype=dtype).eval()


def _freqs(batch, s_txt, s_img, head_dim, device):
    import torch
    from diffsynth.models.flux_dit import RoPEEmbedding

    axes = {64: [8, 28, 28], 128: [16, 56, 56]}[head_dim]
    side = max(1, int(math.sqrt(s_img)))
    idx = torch.arange(s_img)
    img = torch.stack([torch.zeros(s_img), (idx // side).float(), (idx % side).float()], -1)
    ids = torch.cat([torch.zeros(s_txt, 3), img])[None].expand(batch, -1, -1)
    return RoPEEmbedding(head_dim * 2, 10000, axes)(ids).to(device)


def _timer(dry_run, warmup, rep_ms):
    if dry_run:
        def run(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return run
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=warmup, rep=rep_ms)


def _eager_chain(chain, qkv_img, qkv_txt, freqs):
    """(image rows, text rows): views of DiffSynth's output, as its projections read them
    (joining them would time a copy the real chain does not make)."""
    return chain(qkv_img, qkv_txt, freqs)


def _fa3_chain(fa3, chain, qkv_img, qkv_txt, freqs):
    """DiffSynth's norms/concat/RoPE, then FA3 on [B, S, H, D]."""
    import torch

    heads, head_dim = chain.num_heads, chain.head_dim

    def split(qkv, nq, nk):
        x = qkv.view(qkv.shape[0], -1, 3 * heads, head_dim).transpose(1, 2)
        q, k, v = x.chunk(3, dim=1)
        return nq(q), nk(k), v

    qb, kb, vb = split(qkv_txt, chain.norm_q_b, chain.norm_k_b)
    qa, ka, va = split(qkv_img, chain.norm_q_a, chain.norm_k_a)
    q, k = chain.apply_rope(torch.cat([qb, qa], 2), torch.cat([kb, ka], 2), freqs)
    v = torch.cat([vb, va], 2)
    o = fa3.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    o = o[0] if isinstance(o, tuple) else o
    return o.reshape(o.shape[0], o.shape[1], heads * head_dim)


def _methods(fa, chain, ws, qkv_txt, qkv_img, freqs, heads, dry, fa3, compiled_chain):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def ours():
        return fa.flux_attention(qkv_img, ws[2], ws[3], freqs, heads, qkv_txt=qkv_txt, wq_txt=ws[0], wk_txt=ws[1])

    methods = {"artaug_fused": ours}
    backends = {"math": SDPBackend.MATH} if dry else {
        "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION}
    for name, backend in backends.items():
        def run_backend(backend=backend):
            with sdpa_kernel(backend):
                return _eager_chain(chain, qkv_img, qkv_txt, freqs)
        methods[f"diffsynth_eager_{name}"] = run_backend
    if fa3 is not None and not dry:
        methods["diffsynth_chain_fa3"] = lambda: _fa3_chain(fa3, chain, qkv_img, qkv_txt, freqs)
    if compiled_chain is not None:
        def run_compiled():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return compiled_chain(chain, qkv_img, qkv_txt, freqs)
        methods["diffsynth_compiled_cudnn"] = run_compiled
    return methods


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    ap.add_argument("--seqs", default="1536,4608,16896", help="total tokens (text + image)")
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rep-ms", type=int, default=60)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before artaug_kernels is imported

    import torch
    import triton
    from artaug_kernels import flux_attention as fa

    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    heads, head_dim, s_txt = (2, 64, 7) if dry else (args.heads, args.head_dim, args.text)
    seqs = [40] if dry else [int(s) for s in args.seqs.split(",")]
    bench = _timer(dry, 10, args.rep_ms)
    torch.manual_seed(0)

    try:
        import flash_attn_interface as fa3
    except Exception:  # noqa: BLE001 - FA3 is optional
        fa3 = None

    chain = _chain_module(heads, head_dim, dtype, device)
    ws = [n.weight for n in (chain.norm_q_b, chain.norm_k_b, chain.norm_q_a, chain.norm_k_a)]
    compiled_chain = None
    if not args.no_compile and not dry:
        compiled_chain = torch.compile(_eager_chain, dynamic=True)
    rows = []
    for seq in seqs:
        s_img = seq - s_txt
        width = 3 * heads * head_dim
        qkv_txt = torch.randn(1, s_txt, width, device=device, dtype=dtype)
        qkv_img = torch.randn(1, s_img, width, device=device, dtype=dtype)
        freqs = _freqs(1, s_txt, s_img, head_dim, device)
        flops = _flops(1, heads, seq, head_dim)
        methods = _methods(fa, chain, ws, qkv_txt, qkv_img, freqs, heads, dry, fa3, compiled_chain)
        with torch.no_grad():
            ref = fa.flux_attention_reference(qkv_img, ws[2], ws[3], freqs, heads, qkv_txt=qkv_txt, wq_txt=ws[0],
                                              wk_txt=ws[1], compute_dtype=torch.float32) if seq <= 4608 else None
            for name, fn in methods.items():
                row = {"seq": seq, "text": s_txt, "heads": heads, "head_dim": head_dim, "dtype": str(dtype),
                       "method": name}
                try:
                    out = fn()
                    if isinstance(out, tuple):  # DiffSynth's chain: (image, text) rows
                        out = torch.cat([out[1], out[0]], 1)
                    if ref is not None:
                        row["max_abs_err_vs_fp32"] = (out.float() - ref.float()).abs().max().item()
                    ms = bench(fn)
                    row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
                except Exception as exc:  # noqa: BLE001 - a missing backend is a row, not a crash
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)

    figures = {}
    for seq in seqs:
        by = {r["method"]: r for r in rows if r["seq"] == seq and "ms" in r}
        if "artaug_fused" not in by:
            continue
        ours_ms = by["artaug_fused"]["ms"]
        eager = [r["ms"] for m, r in by.items() if m.startswith("diffsynth_eager_")]
        fig = {"tflops": by["artaug_fused"]["tflops"]}
        if eager:
            fig["speedup_vs_best_eager"] = min(eager) / ours_ms
        if "diffsynth_compiled_cudnn" in by:
            fig["speedup_vs_compiled_cudnn"] = by["diffsynth_compiled_cudnn"]["ms"] / ours_ms
        if "diffsynth_chain_fa3" in by:
            fig["speedup_vs_fa3_chain"] = by["diffsynth_chain_fa3"]["ms"] / ours_ms
        figures[f"S{seq}"] = fig
    figures["tma_kv_loads"] = "on" if fa.USE_TMA["enabled"] else "off (fell back to pointer loads)"
    best = getattr(fa._attn_fwd_kernel, "best_config", None)
    if best is not None:
        figures["last_best_config"] = str(best)
    result = {
        "name": "flux_attention",
        "device": "cpu (interpreter)" if dry else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dry_run": dry,
        "rows": rows,
        "figures": figures,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for key, fig in figures.items():
        print(key, fig if isinstance(fig, str) else " ".join(f"{k}={v:.3g}" for k, v in fig.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
