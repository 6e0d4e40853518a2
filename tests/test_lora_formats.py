"""Each LoRA format against an fp64 reference computed from our own key table, on the
tiny FLUX DiT and CLIP encoder built from DiffSynth's classes; plus load/unload and
error paths."""

import json
import logging

import pytest
import torch
from artaug_kernels import LoRAMergeOverflowError
from artaug_kernels.lora_merge import rounding_stats
from safetensors.torch import save_file

from artaug_ext.lora import LoRAFormatError, UnsupportedLoRAError, load_artaug, load_lora, unload_lora
from artaug_ext.tiny.models import TinyFluxDiT, TinyFluxTextEncoderClip, TinyFluxTextEncoderT5

DIM = 128


@pytest.fixture
def dit():
    torch.manual_seed(0)
    return TinyFluxDiT(dim=DIM).to(torch.bfloat16)


def pair(rows, cols, r, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, cols, generator=g) / r ** 0.25).to(dtype), \
        (torch.randn(rows, r, generator=g) * 0.002 / r ** 0.25).to(dtype)


def expect(model, updates):
    """fp64 merged weights: updates = [(module, row0, A, B, scale)]."""
    mods = dict(model.named_modules())
    ref = {}
    for name, row0, a, b, s in updates:
        w = ref.setdefault(name, mods[name].weight.detach().double().clone())
        w[row0:row0 + b.shape[0]] += s * (b.double() @ a.double())
    return ref


def assert_merged(model, ref, before):
    mods = dict(model.named_modules())
    for name, exact in ref.items():
        st = rounding_stats(mods[name].weight.data, exact, before[name + ".weight"])
        assert st["n_misrounded"] <= max(1e-4 * st["n"], 1) and st["max_ulp_operand"] <= 1.0, (name, st)
    untouched = {k for k in before if k[:-len(".weight")] not in ref}
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in untouched)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def run(model, sd, updates, alpha=1.0, **kw):
    before = snapshot(model)
    ref = expect(model, updates)
    rep = load_lora(model, sd, alpha, **kw)
    assert_merged(model, ref, before)
    unload_lora(model, rep.handle)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return rep


def test_kohya_per_layer_alpha_and_globals(dit):
    sd, updates = {}, []
    layers = [("double_blocks_0_img_attn_qkv", "blocks.0.attn.a_to_qkv", 3 * DIM, DIM, 8, 4.0),
              ("double_blocks_1_txt_mlp_2", "blocks.1.ff_b.2", DIM, 4 * DIM, 4, 1.0),
              ("double_blocks_0_img_mod_lin", "blocks.0.norm1_a.linear", 6 * DIM, DIM, 2, None),
              ("single_blocks_3_linear1", "single_blocks.3.to_qkv_mlp", 7 * DIM, DIM, 16, 32.0),
              ("single_blocks_0_linear2", "single_blocks.0.proj_out", DIM, 5 * DIM, 3, 6.0),
              ("single_blocks_2_modulation_lin", "single_blocks.2.norm.linear", 3 * DIM, DIM, 1, 1.0),
              ("img_in", "x_embedder", DIM, 64, 4, 4.0), ("txt_in", "context_embedder", DIM, 64, 4, 2.0),
              ("time_in_in_layer", "time_embedder.timestep_embedder.0", DIM, 256, 2, 2.0),
              ("vector_in_out_layer", "pooled_text_embedder.2", DIM, DIM, 2, 2.0),
              ("guidance_in_in_layer", "guidance_embedder.timestep_embedder.0", DIM, 256, 2, 2.0),
              ("final_layer_linear", "final_proj_out", 64, DIM, 4, 4.0),
              ("final_layer_adaLN_modulation_1", "final_norm_out.linear", 2 * DIM, DIM, 4, 4.0)]
    for i, (key, mod, rows, cols, r, alpha) in enumerate(layers):
        a, b = pair(rows, cols, r, i)
        sd[f"lora_unet_{key}.lora_down.weight"] = a
        sd[f"lora_unet_{key}.lora_up.weight"] = b
        if alpha is not None:
            sd[f"lora_unet_{key}.alpha"] = torch.tensor(alpha)
        updates.append((mod, 0, a, b, 0.7 * (1.0 if alpha is None else alpha / r)))
    rep = run(dit, sd, updates, alpha=0.7)
    assert rep.formats == ["kohya"] and len(rep.merged) == len(layers)
    # the same keys under BFL dotted names with a diffusion_model. prefix
    bfl = {}
    for k, v in sd.items():
        base, _, suffix = k[len("lora_unet_"):].partition(".")
        for tok in ("double_blocks_", "single_blocks_"):
            if base.startswith(tok):
                n, _, rest = base[len(tok):].partition("_")
                base = f"{tok[:-1]}.{n}.{rest.replace('attn_', 'attn.').replace('mlp_', 'mlp.').replace('mod_lin', 'mod.lin').replace('modulation_lin', 'modulation.lin')}"
        base = {"time_in_in_layer": "time_in.in_layer", "vector_in_out_layer": "vector_in.out_layer",
                "guidance_in_in_layer": "guidance_in.in_layer", "final_layer_linear": "final_layer.linear",
                "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}.get(base, base)
        bfl[f"diffusion_model.{base}.{suffix.replace('lora_down', 'lora_A').replace('lora_up', 'lora_B')}"] = v
    rep = run(dit, bfl, updates, alpha=0.7)
    assert rep.formats == ["bfl"]
    # ComfyUI-style "model.diffusion_model." prefix (contains ".diff": not a LyCORIS diff file)
    rep = run(dit, {"model." + k: v for k, v in bfl.items()}, updates, alpha=0.7)
    assert rep.formats == ["bfl"]


def test_diffusers_split_qkv_and_q_v_only(dit):
    sd, updates = {}, []
    specs = [("transformer_blocks.0.attn.to_q", "blocks.0.attn.a_to_qkv", 0),
             ("transformer_blocks.0.attn.to_v", "blocks.0.attn.a_to_qkv", 2 * DIM),  # q and v only
             ("transformer_blocks.1.attn.add_k_proj", "blocks.1.attn.b_to_qkv", DIM),
             ("transformer_blocks.1.attn.to_out.0", "blocks.1.attn.a_to_out", 0),
             ("transformer_blocks.0.ff_context.net.0.proj", "blocks.0.ff_b.0", 0),
             ("single_transformer_blocks.2.attn.to_k", "single_blocks.2.to_qkv_mlp", DIM),
             ("single_transformer_blocks.2.proj_mlp", "single_blocks.2.to_qkv_mlp", 3 * DIM),
             ("single_transformer_blocks.1.proj_out", "single_blocks.1.proj_out", 0),
             ("time_text_embed.text_embedder.linear_1", "pooled_text_embedder.0", 0),
             ("proj_out", "final_proj_out", 0)]
    mods = dict(dit.named_modules())
    for i, (key, mod, row0) in enumerate(specs):
        w = mods[mod].weight
        rows = 4 * DIM if key.endswith("proj_mlp") else (DIM if row0 or "attn.to_" in key or "add_" in key else w.shape[0])
        if key == "transformer_blocks.1.attn.to_out.0":
            rows = DIM
        a, b = pair(rows, w.shape[1], 4, i, torch.float32)
        sd[f"transformer.{key}.lora_A.weight"] = a
        sd[f"transformer.{key}.lora_B.weight"] = b
        updates.append((mod, row0, a, b, 1.0))
    # diffusers' final modulation is (scale, shift): halves swapped into DiffSynth's order
    a, b = pair(2 * DIM, DIM, 4, 99, torch.float32)
    sd["transformer.norm_out.linear.lora_A.weight"] = a
    sd["transformer.norm_out.linear.lora_B.weight"] = b
    updates += [("final_norm_out.linear", 0, a, b[DIM:], 1.0), ("final_norm_out.linear", DIM, a, b[:DIM], 1.0)]
    rep = run(dit, sd, updates)
    assert rep.formats == ["diffusers"]


def test_peft_folder_with_config_alpha(dit, tmp_path):
    a1, b1 = pair(DIM, DIM, 8, 1)
    a2, b2 = pair(3 * DIM, DIM, 8, 2)
    sd = {"base_model.model.transformer_blocks.0.attn.to_k.lora_A.weight": a1,
          "base_model.model.transformer_blocks.0.attn.to_k.lora_B.weight": b1,
          "base_model.model.blocks.1.attn.b_to_qkv.lora_A.weight": a2,
          "base_model.model.blocks.1.attn.b_to_qkv.lora_B.weight": b2}
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "alpha_pattern": {"b_to_qkv": 4}}))
    run(dit, str(tmp_path), [("blocks.0.attn.a_to_qkv", DIM, a1, b1, 2.0), ("blocks.1.attn.b_to_qkv", 0, a2, b2, 0.5)])


def test_diffsynth_training_output_file(dit, tmp_path):
    a, b = pair(7 * DIM, DIM, 4, 3)
    a2, b2 = pair(4 * DIM, DIM, 4, 4)
    sd = {"single_blocks.1.to_qkv_mlp.lora_A.default.weight": a, "single_blocks.1.to_qkv_mlp.lora_B.default.weight": b,
          "blocks.0.ff_a.0.lora_A.default.weight": a2, "blocks.0.ff_a.0.lora_B.default.weight": b2}
    path = tmp_path / "epoch-0.safetensors"
    save_file(sd, str(path))
    rep = run(dit, str(path), [("single_blocks.1.to_qkv_mlp", 0, a, b, 1.0), ("blocks.0.ff_a.0", 0, a2, b2, 1.0)])
    assert rep.formats == ["diffsynth"]


def test_xlabs(dit):
    a, b = pair(3 * DIM, DIM, 4, 5)
    a2, b2 = pair(DIM, DIM, 4, 6)
    sd = {"double_blocks.1.processor.qkv_lora2.down.weight": a, "double_blocks.1.processor.qkv_lora2.up.weight": b,
          "double_blocks.0.processor.proj_lora1.down.weight": a2, "double_blocks.0.processor.proj_lora1.up.weight": b2}
    rep = run(dit, sd, [("blocks.1.attn.b_to_qkv", 0, a, b, 1.0), ("blocks.0.attn.a_to_out", 0, a2, b2, 1.0)])
    assert rep.formats == ["xlabs"]


def test_xlabs_single_blocks(dit):
    """x-flux's SingleStreamBlockLoraProcessor: qkv_lora beside the q/k/v rows of linear1
    (to_qkv_mlp rows 0:3 dim), proj_lora on linear2's input (proj_out). No alpha: scale 1."""
    a, b = pair(3 * DIM, DIM, 4, 8)
    a2, b2 = pair(DIM, 5 * DIM, 4, 9)
    sd = {"diffusion_model.single_blocks.2.processor.qkv_lora.down.weight": a,
          "diffusion_model.single_blocks.2.processor.qkv_lora.up.weight": b,
          "single_blocks.0.processor.proj_lora.down.weight": a2, "single_blocks.0.processor.proj_lora.up.weight": b2}
    rep = run(dit, sd, [("single_blocks.2.to_qkv_mlp", 0, a, b, 1.0), ("single_blocks.0.proj_out", 0, a2, b2, 1.0)])
    assert rep.formats == ["xlabs"] and rep.merged == ["dit:single_blocks.0.proj_out", "dit:single_blocks.2.to_qkv_mlp"]
    with pytest.raises(LoRAFormatError, match="map to no module"):
        load_lora(dit, {"single_blocks.0.processor.qkv_lora1.down.weight": a,
                        "single_blocks.0.processor.qkv_lora1.up.weight": b})


# T5 (transformers T5EncoderModel, FLUX's text_encoder_2) module names, written out by hand:
# kohya suffix -> module under encoder.block.N
T5_LAYERS = [("layer_0_SelfAttention_q", "layer.0.SelfAttention.q"), ("layer_0_SelfAttention_k", "layer.0.SelfAttention.k"),
             ("layer_0_SelfAttention_v", "layer.0.SelfAttention.v"), ("layer_0_SelfAttention_o", "layer.0.SelfAttention.o"),
             ("layer_1_DenseReluDense_wi_0", "layer.1.DenseReluDense.wi_0"),
             ("layer_1_DenseReluDense_wi_1", "layer.1.DenseReluDense.wi_1"),
             ("layer_1_DenseReluDense_wo", "layer.1.DenseReluDense.wo")]


def t5_lora(t5, style, seed=0):
    """Every T5 linear of both blocks in one key style; returns (state dict, updates)."""
    mods = dict(t5.named_modules())
    sd, updates = {}, []
    for n in range(2):
        for i, (kohya, native) in enumerate(T5_LAYERS):
            mod = f"encoder.block.{n}.{native}"
            w = mods[mod].weight
            r = 1 + (i + n) % 4
            a, b = pair(w.shape[0], w.shape[1], r, seed + 10 * n + i)
            alpha = None
            if style in ("lora_te3_", "lora_te2_"):
                base, down, up = f"{style}encoder_block_{n}_{kohya}", "lora_down", "lora_up"
                alpha = float(2 * r) if i % 2 else None
            elif style == "diffusers":
                base, down, up = f"text_encoder_2.{mod}", "lora_A", "lora_B"
            else:  # PEFT on the T5 module itself
                base, down, up = f"base_model.model.{mod}", "lora_A", "lora_B"
            sd[f"{base}.{down}.weight"], sd[f"{base}.{up}.weight"] = a, b
            if alpha is not None:
                sd[f"{base}.alpha"] = torch.tensor(alpha)
            updates.append((mod, 0, a, b, 0.8 * (1.0 if alpha is None else alpha / r)))
    return sd, updates


@pytest.mark.parametrize("style,fmt", [("lora_te3_", "kohya-te2"), ("lora_te2_", "kohya-te2"),
                                       ("diffusers", "diffusers-te2"), ("peft", "diffsynth")])
def test_t5_te2_keys_on_t5_module(style, fmt):
    torch.manual_seed(0)
    t5 = TinyFluxTextEncoderT5().to(torch.bfloat16)
    sd, updates = t5_lora(t5, style)
    rep = run(t5, sd, updates, alpha=0.8)
    assert rep.formats == [fmt] and len(rep.merged) == 14
    assert all(m.startswith("te2:encoder.block.") for m in rep.merged)


def test_t5_prefix_with_clip_shaped_names_is_not_t5():
    """SD3 / SDXL name CLIP-G `lora_te2_` / `text_encoder_2.text_model...`: not FLUX's T5, so
    unmapped (an error), never merged into the T5."""
    t5 = TinyFluxTextEncoderT5().to(torch.bfloat16)
    a, b = pair(64, 64, 2, 1)
    for base in ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
                 "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
                 "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi"):  # T5 v1.0 FFN: FLUX's T5 is gated
        with pytest.raises(LoRAFormatError, match="matches no layer"):
            load_lora(t5, {f"{base}.lora_down.weight": a, f"{base}.lora_up.weight": b}, strict=False)


def test_t5_clip_and_dit_through_tiny_pipeline():
    """One kohya file with DiT, CLIP (te1) and T5 (te3) keys on artaug_ext's tiny FLUX
    pipeline: each lands in its component; a DiT alone skips the text-encoder keys; unload
    restores all three bit for bit."""
    import artaug_ext

    pipe = artaug_ext.load_pipeline("tiny-random", device="cpu")
    dit, te1, te2 = pipe.dit, pipe.text_encoder_1, pipe.text_encoder_2
    for model in (dit, te1, te2):  # bf16, where one exact rounding is checkable (fp32 accumulation in fp32: not)
        model.to(torch.bfloat16)
    sd, upd_t5 = t5_lora(te2, "lora_te3_", seed=100)
    w = te1.get_submodule("encoders.0.fc1").weight
    a1, b1 = pair(w.shape[0], w.shape[1], 2, 3, torch.float32)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = a1
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = b1
    w = dit.get_submodule("blocks.0.attn.a_to_out").weight
    a2, b2 = pair(w.shape[0], w.shape[1], 2, 4, torch.float32)
    sd["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = a2
    sd["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = b2
    befores = [snapshot(m) for m in (dit, te1, te2)]
    refs = [expect(dit, [("blocks.0.attn.a_to_out", 0, a2, b2, 0.8)]),
            expect(te1, [("encoders.0.fc1", 0, a1, b1, 0.8)]), expect(te2, upd_t5)]
    rep = load_lora(pipe, sd, 0.8)
    assert len(rep.merged) == 16 and rep.formats == ["kohya", "kohya-te1", "kohya-te2"]
    for model, ref, before in zip((dit, te1, te2), refs, befores, strict=True):
        assert_merged(model, ref, before)
    rep2 = load_lora(dit, sd, 0.8)
    assert len(rep2.merged) == 1 and len(rep2.skipped) == 15
    assert sum("text encoder 2 (T5)" in s for s in rep2.skipped) == 14
    unload_lora(dit)
    unload_lora(pipe)
    for model, before in zip((dit, te1, te2), befores, strict=True):
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_clip_te1_keys_on_pipeline_like_target(dit):
    te = TinyFluxTextEncoderClip().to(torch.bfloat16)

    class Pipe:  # what load_lora reads from a FluxImagePipeline
        def __init__(self):
            self.dit, self.text_encoder_1 = dit, te

    pipe = Pipe()
    mods = dict(te.named_modules())
    sd, upd = {}, []
    for i, (k, m) in enumerate([("self_attn_q_proj", "attn.to_q"), ("mlp_fc2", "fc2")]):
        w = mods[f"encoders.1.{m}"].weight
        a, b = pair(w.shape[0], w.shape[1], 2, i)
        sd[f"lora_te1_text_model_encoder_layers_1_{k}.lora_down.weight"] = a
        sd[f"lora_te1_text_model_encoder_layers_1_{k}.lora_up.weight"] = b
        sd[f"lora_te1_text_model_encoder_layers_1_{k}.alpha"] = torch.tensor(1.0)
        upd.append((f"encoders.1.{m}", 0, a, b, 0.5))
    a, b = pair(3 * DIM, DIM, 2, 7)
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] = a
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = b
    before_te, before_dit = snapshot(te), snapshot(dit)
    ref_te, ref_dit = expect(te, upd), expect(dit, [("blocks.0.attn.a_to_qkv", 0, a, b, 1.0)])
    rep = load_lora(pipe, sd)
    assert_merged(te, ref_te, before_te)
    assert_merged(dit, ref_dit, before_dit)
    assert len(rep.merged) == 3
    # a DiT alone: the text-encoder keys are skipped, not errors
    rep2 = load_lora(dit, sd)
    assert len(rep2.skipped) == 2 and len(rep2.merged) == 1
    unload_lora(dit)
    unload_lora(pipe)
    assert all(torch.equal(v, before_te[k]) for k, v in te.state_dict().items())
    assert all(torch.equal(v, before_dit[k]) for k, v in dit.state_dict().items())


def test_lifo_unload_and_stacking(dit):
    before = snapshot(dit)
    a, b = pair(3 * DIM, DIM, 4, 1)
    sd = {"blocks.0.attn.a_to_qkv.lora_A.weight": a, "blocks.0.attn.a_to_qkv.lora_B.weight": b}
    r1 = load_lora(dit, sd, 1.0)
    mid = snapshot(dit)
    r2 = load_lora(dit, sd, -0.5)
    assert r1.restore_bytes == 3 * DIM * DIM * 2
    with pytest.raises(ValueError, match="LIFO"):
        unload_lora(dit, r1.handle)
    unload_lora(dit, r2)
    assert all(torch.equal(v, mid[k]) for k, v in dit.state_dict().items())
    assert unload_lora(dit) == 1
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())


def test_errors(dit, caplog):
    a, b = pair(3 * DIM, DIM, 4, 1)
    good = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b}
    bad = dict(good, **{"lora_unet_double_blocks_0_img_foo.lora_down.weight": a,
                        "lora_unet_double_blocks_0_img_foo.lora_up.weight": b,
                        "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": a,
                        "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": b})
    before = snapshot(dit)
    with pytest.raises(LoRAFormatError, match="3 LoRA keys map to no module") as e:
        load_lora(dit, bad)
    assert "img_foo" in str(e.value) and "blocks_7" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())
    with caplog.at_level(logging.WARNING):
        rep = load_lora(dit, bad, strict=False)
    assert "3 LoRA keys" in caplog.text and len(rep.merged) == 1
    unload_lora(dit)
    with pytest.raises(LoRAFormatError, match="matches no layer"):
        load_lora(dit, {"foo.lora_A.weight": a, "foo.lora_B.weight": b}, strict=False)
    for key, what in [("lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", "LoKr"),
                      ("lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a", "LoHa"),
                      ("transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector", "DoRA"),
                      ("diffusion_model.double_blocks.0.img_attn.qkv.diff", "full-weight diff"),
                      ("diffusion_model.double_blocks.0.img_attn.qkv.diff_b", "full-weight diff")]:
        with pytest.raises(UnsupportedLoRAError, match=f"this is a.* {what} file, not supported yet"):
            load_lora(dit, dict(good, **{key: a}))
    wrong = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": a,
             "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": b}
    with pytest.raises(LoRAFormatError, match=r"blocks.0.attn.a_to_out.*weight \(128, 128\).*B \(384, 4\)"):
        load_lora(dit, wrong)
    with pytest.raises(LoRAFormatError, match="no such file or folder, and not a LoRA we know by name"):
        load_lora(dit, "/no/such/lora.safetensors")
    # a plain (not DiffSynth-wrapped) layer in a dtype that cannot take the merge: an error,
    # not a LoRA list that no forward would ever read
    qkv = dit.blocks[0].attn.a_to_qkv
    w_bf16 = qkv.weight.data
    qkv.weight.data = w_bf16.to(torch.float8_e4m3fn)
    try:
        with pytest.raises(LoRAFormatError, match=r"blocks.0.attn.a_to_qkv: weight is torch.float8_e4m3fn"):
            load_lora(dit, good)
        assert not hasattr(qkv, "lora_A_weights")
    finally:
        qkv.weight.data = w_bf16
    nan_b = b.clone()
    nan_b[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        load_lora(dit, dict(good, **{"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": nan_b}))
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_overflow_restores_all(dit):
    before = snapshot(dit)
    a, b = pair(DIM, DIM, 1, 1)
    big = torch.full((3 * DIM, 1), 3e38, dtype=torch.bfloat16)
    sd = {"blocks.0.attn.a_to_out.lora_A.weight": a, "blocks.0.attn.a_to_out.lora_B.weight": b,
          "blocks.1.attn.a_to_qkv.lora_A.weight": torch.full((1, DIM), 100.0).bfloat16(),
          "blocks.1.attn.a_to_qkv.lora_B.weight": big}
    with pytest.raises(LoRAMergeOverflowError, match="blocks.1.attn.a_to_qkv"):
        load_lora(dit, sd)
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())


def test_vram_managed_dit_is_hotloaded(caplog):
    from diffsynth.core.vram.layers import AutoWrappedLinear, enable_vram_management

    torch.manual_seed(0)
    dit = TinyFluxDiT(dim=DIM)
    plain = TinyFluxDiT(dim=DIM)
    plain.load_state_dict(dit.state_dict())
    cfg = {k: v for name in ("offload", "onload", "preparing", "computation")
           for k, v in ((f"{name}_dtype", torch.float32), (f"{name}_device", "cpu"))}
    dit = enable_vram_management(dit, {torch.nn.Linear: AutoWrappedLinear}, vram_config=cfg)
    a, b = pair(DIM, DIM, 4, 1, torch.float32)
    sd = {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a,
          "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": b}
    with caplog.at_level(logging.WARNING):
        rep = load_lora(dit, sd, 2.0)
    assert "hot-loaded" in caplog.text and rep.hotloaded == ["dit:blocks.0.attn.a_to_qkv"]
    load_lora(plain, sd, 2.0)
    x = torch.randn(3, DIM)
    torch.testing.assert_close(dit.blocks[0].attn.a_to_qkv(x), plain.blocks[0].attn.a_to_qkv(x), atol=1e-5, rtol=1e-5)
    unload_lora(dit)
    assert dit.blocks[0].attn.a_to_qkv.lora_A_weights == []


def test_load_artaug_through_hub(dit, tmp_path, monkeypatch):
    import artaug_ext.hub as hub

    a, b = pair(3 * DIM, DIM, 4, 1)
    path = tmp_path / "merged_lora.safetensors"
    save_file({"lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight": a,
               "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight": b,
               "lora_unet_double_blocks_1_img_attn_qkv.alpha": torch.tensor(4.0)}, str(path))
    calls = []

    def fake(card, model_dir=None):
        calls.append((card.name, model_dir))
        return {"lora": [str(path)]}

    monkeypatch.setattr(hub, "resolve_model_files", fake)

    class Pipe:
        def __init__(self):
            self.dit, self.text_encoder_1 = dit, None

    pipe = Pipe()
    before = snapshot(dit)
    ref = expect(dit, [("blocks.1.attn.a_to_qkv", 0, a, b, 0.6)])
    rep = load_artaug(pipe, alpha=0.6, model_dir="/models")
    assert calls == [("artaug", "/models")] and rep.merged == ["dit:blocks.1.attn.a_to_qkv"]
    assert_merged(dit, ref, before)
    unload_lora(pipe)
    load_artaug(pipe, variant="kontext")
    assert calls[-1] == ("artaug-kontext", None)
    with pytest.raises(ValueError, match="variant"):
        load_artaug(pipe, variant="schnell")
