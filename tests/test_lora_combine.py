"""Combine / truncate / export, and a round trip through DiffSynth's own FluxLoRALoader."""

import copy

import pytest
import torch
from safetensors import safe_open

from artaug_ext.lora import combine_loras, load_lora, lora_layers, save_kohya, truncate_layer
from artaug_ext.lora.combine import LoRALayer
from artaug_ext.tiny.models import TinyFluxDiT

DIM = 128


def lora(seed, r=4, qv_only=False):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(2):
        sd[f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight"] = torch.randn(r, DIM, generator=g)
        sd[f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_up.weight"] = torch.randn(3 * DIM, r, generator=g) * 0.01
        sd[f"lora_unet_double_blocks_{i}_img_attn_qkv.alpha"] = torch.tensor(float(r) / 2)
    sd["lora_unet_single_blocks_1_linear2.lora_down.weight"] = torch.randn(r, 5 * DIM, generator=g)
    sd["lora_unet_single_blocks_1_linear2.lora_up.weight"] = torch.randn(DIM, r, generator=g) * 0.01
    if qv_only:
        for p in ("q", "v"):
            sd[f"transformer.transformer_blocks.1.attn.to_{p}.lora_A.weight"] = torch.randn(r, DIM, generator=g)
            sd[f"transformer.transformer_blocks.1.attn.to_{p}.lora_B.weight"] = torch.randn(DIM, r, generator=g) * 0.01
    return sd


def dense(layers):
    return {k: v.B.double() @ v.A.double() for k, v in layers.items()}


def test_exact_sum_and_average():
    l1, l2 = lora(1), lora(2, r=8, qv_only=True)
    d1, d2 = dense(lora_layers(l1)), dense(lora_layers(l2))
    combined, info = combine_loras([l1, l2], weights=[0.5, -2.0])
    out = dense(combined)
    for k in set(d1) | set(d2):
        exp = 0.5 * d1.get(k, 0) + -2.0 * d2.get(k, 0)
        torch.testing.assert_close(out[k], exp, atol=1e-6, rtol=1e-5)
    assert combined["dit:blocks.0.attn.a_to_qkv"].rank == 12
    avg, _ = combine_loras([l1, l2], weights=[1, 3], average=True)
    exp = 0.25 * d1["dit:blocks.0.attn.a_to_qkv"] + 0.75 * d2["dit:blocks.0.attn.a_to_qkv"]
    torch.testing.assert_close(dense(avg)["dit:blocks.0.attn.a_to_qkv"], exp, atol=1e-6, rtol=1e-5)
    # the q/v-only layer sits in rows 0:128 and 256:384 of the fused qkv; k rows are zero
    qv = {k: v for k, v in l2.items() if k.startswith("transformer.")}
    qkv = dense(lora_layers(qv))["dit:blocks.1.attn.a_to_qkv"]
    assert qkv[DIM:2 * DIM].abs().max() == 0 and qkv[:DIM].abs().max() > 0 and qkv[2 * DIM:].abs().max() > 0


def test_truncation_is_best_rank_k():
    g = torch.Generator().manual_seed(0)
    layer = LoRALayer(torch.randn(24, 200, generator=g), torch.randn(150, 24, generator=g))
    full = layer.B.double() @ layer.A.double()
    s = torch.linalg.svdvals(full)
    for k in (1, 5, 24, 30):
        t, energy = truncate_layer(layer, k)
        assert t.rank == min(k, 24)
        err = torch.linalg.norm(full - t.B.double() @ t.A.double())
        best = s[k:].square().sum().sqrt()  # Eckart-Young
        assert err <= best * (1 + 1e-4) + 1e-3
        assert abs(energy - float(s[:k].square().sum() / s.square().sum())) < 1e-6
    # no centring: a rank-1 matrix with a large mean survives truncation exactly
    a = torch.ones(1, 64) * 3
    b = torch.arange(40.0)[:, None]
    t, energy = truncate_layer(LoRALayer(torch.cat([a, a]), torch.cat([b, b], dim=1)), 1)
    torch.testing.assert_close(t.B @ t.A, 2 * b @ a, atol=1e-3, rtol=1e-5)
    assert energy == pytest.approx(1.0)


def test_export_roundtrip_with_diffsynth_loader(tmp_path):
    """Our kohya export, loaded by DiffSynth's FluxLoRALoader (fp32) and by load_lora, gives
    the merged weights of the original LoRAs."""
    from diffsynth.utils.lora.flux import FluxLoRALoader

    l1, l2 = lora(1), lora(2, r=8, qv_only=True)
    combined, info = combine_loras([l1, l2], weights=[1.0, 0.5], rank=6)
    path = save_kohya(combined, str(tmp_path / "combined.safetensors"), metadata={"note": "test"},
                      dtype=torch.float32)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["note"] == "test" and "lora_unet_double_blocks_1_img_attn_qkv.alpha" in keys

    torch.manual_seed(0)
    base = TinyFluxDiT(dim=DIM)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    load_lora(ours, path)
    with safe_open(path, framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    FluxLoRALoader(torch_dtype=torch.float32).fuse_lora_to_base_model(theirs, sd, alpha=1.0)
    expected = dense(combined)
    for key, delta in expected.items():
        mod = key.split(":", 1)[1]
        w0 = base.get_submodule(mod).weight.double()
        for model in (ours, theirs):
            got = model.get_submodule(mod).weight.double()
            torch.testing.assert_close(got, w0 + delta, atol=1e-6, rtol=0)
    # energy is reported per layer (every layer here had rank > 6)
    assert set(info["energy"]) == set(combined) and 0 < info["min_energy"] < 1


def test_export_rank_not_exact_in_bf16():
    """bf16 holds 256 but not 257: the stored alpha rounds, B absorbs the difference, so
    alpha / rank * B @ A read back from the file is the layer's delta."""
    from artaug_ext.lora.combine import kohya_state_dict

    g = torch.Generator().manual_seed(0)
    for r in (257, 300, 513):
        layer = LoRALayer(torch.randn(r, DIM, generator=g), torch.randn(3 * DIM, r, generator=g) * 0.01)
        sd = kohya_state_dict({"dit:blocks.0.attn.a_to_qkv": layer}, dtype=torch.bfloat16)
        back = lora_layers(sd)["dit:blocks.0.attn.a_to_qkv"]
        exp = layer.B.double() @ layer.A.double()
        err = (back.B.double() @ back.A.double() - exp).norm() / exp.norm()
        assert err < 3e-3, (r, err)  # bf16 rounding of the factors only (2.4e-3; a wrong scale at 257: 4.5e-3)
        bias = ((back.B.double() @ back.A.double()) * exp).sum() / exp.square().sum() - 1
        assert abs(bias) < 1e-4, (r, bias)  # 1e-5 here; alpha rounded to 256 at rank 257: -3.9e-3


def test_export_t5_layers_as_kohya_te3(tmp_path):
    """T5 (text_encoder_2) layers export under kohya's FLUX prefix `lora_te3_` and read back
    as the same deltas; DiffSynth's loader still fuses the DiT part of such a file."""
    from diffsynth.utils.lora.flux import FluxLoRALoader

    from artaug_ext.tiny.models import TinyFluxTextEncoderT5

    g = torch.Generator().manual_seed(5)
    sd = lora(3)
    for mod, rows, cols in (("encoder.block.1.layer.0.SelfAttention.v", 64, 64),
                            ("encoder.block.0.layer.1.DenseReluDense.wo", 64, 128)):
        sd[f"text_encoder_2.{mod}.lora_A.weight"] = torch.randn(3, cols, generator=g)
        sd[f"text_encoder_2.{mod}.lora_B.weight"] = torch.randn(rows, 3, generator=g) * 0.01
    layers = lora_layers(sd)
    assert {"te2:encoder.block.1.layer.0.SelfAttention.v", "te2:encoder.block.0.layer.1.DenseReluDense.wo"} <= set(layers)
    path = save_kohya(layers, str(tmp_path / "t5.safetensors"), dtype=torch.float32)
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        back_sd = {k: f.get_tensor(k) for k in keys}
    assert "lora_te3_encoder_block_1_layer_0_SelfAttention_v.lora_down.weight" in keys
    assert "lora_te3_encoder_block_0_layer_1_DenseReluDense_wo.alpha" in keys
    want, got = dense(layers), dense(lora_layers(path))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-9, rtol=1e-6)
    torch.manual_seed(0)
    t5 = TinyFluxTextEncoderT5()
    w0 = t5.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo").weight.double().clone()
    rep = load_lora(t5, path)  # strict: the DiT keys are skipped (not unmapped) on a T5 alone
    assert len(rep.merged) == 2 and len(rep.skipped) == 3
    torch.testing.assert_close(t5.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo").weight.double(),
                               w0 + want["te2:encoder.block.0.layer.1.DenseReluDense.wo"], atol=1e-6, rtol=0)
    torch.manual_seed(0)
    base = TinyFluxDiT(dim=DIM)
    theirs = copy.deepcopy(base)
    FluxLoRALoader(torch_dtype=torch.float32).fuse_lora_to_base_model(theirs, back_sd, alpha=1.0)
    mod = "single_blocks.1.proj_out"
    torch.testing.assert_close(theirs.get_submodule(mod).weight.double(),
                               base.get_submodule(mod).weight.double() + want[f"dit:{mod}"], atol=1e-6, rtol=0)
