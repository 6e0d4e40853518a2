"""Issue 18 §3: the FLUX.1-dev shape table against DiffSynth's classes, the host-memory formula
against a measured stand-in, the dry run's memory and DDP time lines, and merges that keep no
host copy (the running base), undone by reading the model files."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, child_env

from artaug_ext.flux_shapes import FLUX_DEV, FluxShapes
from artaug_ext.recipe.memory import memory_plan
from artaug_ext.train.settings import FLUX_LORA_TARGETS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_flux_dev_table_is_diffsynths_dit_built_on_meta():
    from diffsynth.models.flux_dit import FluxDiT
    from diffsynth.models.flux_text_encoder_clip import FluxTextEncoderClip
    from diffsynth.models.flux_text_encoder_t5 import FluxTextEncoderT5
    from diffsynth.models.flux_vae import FluxVAEDecoder, FluxVAEEncoder

    with torch.device("meta"):
        dit = FluxDiT()
        counts = [sum(p.numel() for p in c().parameters()) for c in (FluxTextEncoderClip, FluxTextEncoderT5)]
        vae = sum(sum(p.numel() for p in c().parameters()) for c in (FluxVAEEncoder, FluxVAEDecoder))
    assert {n: tuple(p.shape) for n, p in dit.named_parameters()} == FLUX_DEV.dit()
    assert counts == [FLUX_DEV.clip_params, FLUX_DEV.t5_params] and vae == FLUX_DEV.vae_params
    touched = FLUX_DEV.linear_weights(FLUX_LORA_TARGETS)
    from artaug_ext.train.lora import lora_target_layers

    assert set(touched) == set(lora_target_layers(dit, 32))
    assert abs(sum(a * b for a, b in touched.values()) - 11.84e9) < 0.01e9  # the "about 11.8 B"


def test_host_memory_formula_agrees_with_a_measured_flux_width_stand_in():
    """FLUX.1-dev's widths, one joint + one single block (0.55 B parameters, bf16), in a fresh
    process: a round LoRA merged into the running base (no undo), then stage 1, LoRA_1's
    exact merge, stage 2, unmerge. glibc's mmap threshold is fixed so freed temporaries go
    back to the OS (its dynamic threshold otherwise keeps ~0.2 GB of them in the heap)."""
    rank, px, text = 4, 64, 8
    env = child_env(MALLOC_MMAP_THRESHOLD_="4194304")
    env.pop("TRITON_INTERPRET", None)  # a user's CPU merge runs torch's ops, not 0.5 B weights through Triton's interpreter
    out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "memory_standin.py"), str(rank), str(px),
                          str(text)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout)
    standin = FluxShapes(joint_blocks=1, single_blocks=1)
    assert {n: tuple(s) for n, s in measured["shapes"].items()} == standin.dit()
    plan = memory_plan(standin, targets=FLUX_LORA_TARGETS, rank=rank, dtype_bytes=2, device="cpu", train_px=px,
                       generate_px=px, text_tokens=text, batch_size=1, gradient_checkpointing=False, pairs=1)
    ratio = measured["growth"] / plan.host_training
    print(f"stand-in: measured peak growth {measured['growth'] / 1e9:.3f} GB, formula {plan.host_training / 1e9:.3f} GB, "
          f"ratio {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15, (measured["growth"], plan.parts)
    # The old runner kept a host copy of the running base as well: twice the copies.
    old = memory_plan(standin, targets=FLUX_LORA_TARGETS, rank=rank, dtype_bytes=2, device="cpu", train_px=px,
                      generate_px=px, text_tokens=text, batch_size=1, gradient_checkpointing=False, pairs=1,
                      running_base_backups=1)
    assert measured["growth"] < 0.6 * old.host_training + 0.4 * plan.host_training


def test_pinned_copies_are_counted_as_torch_allocates_them():
    from artaug_ext.recipe.memory import pinned_bytes

    assert [pinned_bytes(n) for n in (0, 1, 2, 3, 4096, 4097, 3072 * 3072 * 2)] == [0, 1, 2, 4, 4096, 8192, 1 << 25]
    plan = memory_plan(FLUX_DEV, targets=FLUX_LORA_TARGETS, rank=32, dtype_bytes=2, device="cuda", train_px=512,
                       generate_px=1024, text_tokens=512, batch_size=1, gradient_checkpointing=True, pairs=100)
    assert plan.host_generation == 0 and plan.parts["LoRA_1 merge backup"] > 11.8e9 * 2


def _dry(recipe, *extra):
    out = subprocess.run([sys.executable, "-m", "artaug_ext.cli", "run", recipe, "--dry-run", *extra],
                         capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_dry_run_prints_memory_and_ddp_training_does_not_divide_by_the_gpus():
    one = _dry("recipes/flux_dev_artaug_8gpu.toml", "--gpus", "1")
    eight = _dry("recipes/flux_dev_artaug_8gpu.toml", "--gpus", "8")
    for text in (one, eight):
        assert "host memory per process:" in text and "GPU memory per process:" in text

    def hours(text):
        line = next(ln for ln in text.splitlines() if "per round:" in ln)
        gen, train = line.split("per round:")[1].split("+")
        return float(gen.split()[0]), float(train.split()[0])

    (g1, t1), (g8, t8) = hours(one), hours(eight)
    # 1000 steps of batch 1 at 0.8 s (the card's step at 1024 px, the recipe's training size), every rank
    assert t8 == t1 == pytest.approx(1000 * 0.8 / 3600, abs=0.006)
    assert g8 == pytest.approx(g1 / 8, abs=0.01)  # generation is sharded by rank


def test_a_merge_without_undo_keeps_no_copy_and_the_files_give_the_base_back(pipe):
    dit = pipe.dit
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    names = ["blocks.0.attn.a_to_qkv", "single_blocks.0.proj_out"]
    layers = {n: dict(dit.named_modules())[n] for n in names}
    sd = {}
    for n, m in layers.items():
        sd[f"{n}.lora_A.weight"] = torch.randn(2, m.in_features, generator=g)
        sd[f"{n}.lora_B.weight"] = torch.randn(m.out_features, 2, generator=g)
    from artaug_ext.lora import LoRAMergeError, load_lora, unload_lora

    with_undo = load_lora(dit, sd)
    expected = {n: m.weight.detach().clone() for n, m in layers.items()}
    unload_lora(dit, with_undo)
    report = load_lora(pipe, sd, undo=False)
    assert report.restore_bytes == 0 and report.handle.backups == []
    assert all(torch.equal(layers[n].weight, expected[n]) for n in names)  # the same exact merge
    stage1 = load_lora(dit, sd, alpha=0.5)  # LoRA_1 on top, with its one host copy
    unload_lora(dit, stage1)
    assert all(torch.equal(layers[n].weight, expected[n]) for n in names)
    with pytest.raises(ValueError, match="without an undo"):
        unload_lora(dit)  # a bare DiT does not know its file
    unload_lora(pipe)  # reads the touched weights from pipe.artaug_model_paths
    assert all(torch.equal(v, base[k]) for k, v in dit.state_dict().items())
    huge = {k: v * 1e30 for k, v in sd.items()}
    with pytest.raises(LoRAMergeError, match="nothing was merged"):
        load_lora(pipe, huge, undo=False)
    assert all(torch.equal(v, base[k]) for k, v in dit.state_dict().items())
    assert not math.isnan(float(dit.blocks[0].attn.a_to_qkv.weight.sum()))


@pytest.mark.parametrize("method", ["torchao_int8_w8a16", "torchao_fp8_w8a16", "bitsandbytes_nf4"])
def test_the_quantised_storage_is_what_diffsynths_backends_store_for_flux_width_linears(method):
    """The plan's bytes of a quantised linear against the tensors DiffSynth's backend makes of
    FLUX.1-dev-width linears on the CPU (its data, scales and zero points)."""
    pytest.importorskip("torchao")
    from artaug_ext.quant import quantize_config
    from artaug_ext.recipe.memory import quantized_bytes

    shapes = {"a_to_out": (3072, 3072), "ff_a.0": (12288, 3072)}
    model = torch.nn.ModuleDict({n.replace(".", "_"): torch.nn.Linear(i, o, bias=False, dtype=torch.bfloat16)
                                 for n, (o, i) in shapes.items()})
    quantize_config(method).quantize_model(model)
    stored = 0
    for layer in model.values():
        w = layer.weight
        if hasattr(w, "__tensor_flatten__"):  # torchao: the data and its per-row scale (and zero point)
            inner = [getattr(w, n) for n in w.__tensor_flatten__()[0]]
        else:  # bitsandbytes: the packed data and its quantisation state's tensors
            inner = [w] + [t for t in vars(w.quant_state).values() if torch.is_tensor(t)]
            nested = getattr(w.quant_state, "state2", None)
            inner += [t for t in vars(nested).values() if torch.is_tensor(t)] if nested is not None else []
        stored += sum(t.numel() * t.element_size() for t in inner)
    assert quantized_bytes(shapes, method) == pytest.approx(stored, rel=0.01)


def test_a_quantised_base_plans_hot_loaded_loras_the_optimiser_and_the_cards_it_fits():
    from artaug_ext.recipe.memory import GB, OPTIMIZER_STATE_BYTES, fits, lora_parameters

    common = dict(targets=FLUX_LORA_TARGETS, rank=32, dtype_bytes=2, device="cuda", train_px=1024, generate_px=1024,
                  text_tokens=512, batch_size=1, gradient_checkpointing=True, pairs=100)
    bf16 = memory_plan(FLUX_DEV, **common)
    int8 = memory_plan(FLUX_DEV, **common, quantize="torchao_int8_w8a16", text_encoders="quantized",
                       hot_loaded_round_loras=1)
    small = memory_plan(FLUX_DEV, **common, quantize="torchao_int8_w8a16", text_encoders="quantized",
                        hot_loaded_round_loras=1, optimizer="adamw8bit", ema=True)
    n_lora = lora_parameters(FLUX_DEV.linear_weights(FLUX_LORA_TARGETS), 32)
    assert int8.parts["LoRA_1 merge backup"] == 0 and bf16.parts["LoRA_1 merge backup"] > 20 * GB
    assert int8.parts["hot-loaded LoRAs (device)"] == 2 * n_lora * 4  # LoRA_1 and one round LoRA, fp32 factors
    # the DiT's 11.9 B linear weights at a byte each (+ a 5-byte row record) instead of two
    assert bf16.parts["weights"] - int8.parts["weights"] > 14 * GB
    assert int8.host_load == FLUX_DEV.dit_params() * 2 and bf16.host_load == 0
    state = small.parts["LoRA_2 training state"] - int8.parts["LoRA_2 training state"]
    assert state == pytest.approx(n_lora * (OPTIMIZER_STATE_BYTES["adamw8bit"] - 8 + 4))  # 8-bit moments, + an EMA
    assert "fits 24 GB, 48 GB, 80 GB" in fits(23 * GB) and "fits 48 GB, 80 GB" in fits(26 * GB)
    assert "fits none" in fits(90 * GB)


def test_the_24gb_recipe_fits_a_24_gb_card_in_every_stage_and_todays_recipe_does_not():
    """`recipes/flux_dev_artaug_24gb.toml`: the DiT and text encoders in int8, 8-bit AdamW, the
    LoRAs hot-loaded: generation and training both under 24 GB (with the CUDA reserve)."""
    pytest.importorskip("torchao")
    small = _dry("recipes/flux_dev_artaug_24gb.toml")
    big = _dry("recipes/flux_dev_artaug.toml")

    def gpu(text):
        line = next(ln for ln in text.splitlines() if "GPU memory per process:" in ln)
        gen, train = line.split("GPU memory per process:")[1].split(",")[:2]
        return float(gen.split()[0]), float(train.split()[0])

    assert "cards: fits 24 GB, 48 GB, 80 GB cards" in small and "cards: fits 48 GB, 80 GB cards" in big
    assert "DiT quantised torchao_int8_w8a16, text encoders quantized" in small
    assert max(gpu(small)) + 1.5 <= 24 * 2**30 / 1e9 and max(gpu(big)) > 24
    assert "LoRA_1 and 1 round LoRA(s) hot-loaded on the GPU" in small and "(adamw8bit)" in small
