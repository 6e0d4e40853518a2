"""The foundation: registration, tiny model files, DiffSynth's real loading path, determinism."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import make_fake_flux_dev, tiny_folder

import artaug_ext
from artaug_ext.registry import keys_hash, our_entries, register
from artaug_ext.tiny.spec import TINY_RANDOM


def test_register_is_idempotent_and_in_place():
    import diffsynth.configs
    import diffsynth.models.model_loader as loader

    before = len(diffsynth.configs.MODEL_CONFIGS)
    assert register() == 0  # already done on import
    assert len(diffsynth.configs.MODEL_CONFIGS) == before
    # The loader holds the same list object, so our entries reach it.
    assert loader.MODEL_CONFIGS is diffsynth.configs.MODEL_CONFIGS
    ours = our_entries()
    assert {e["model_name"] for e in ours} >= {"flux_dit", "flux_text_encoder_clip", "flux_text_encoder_t5",
                                               "flux_vae_encoder", "flux_vae_decoder"}
    for e in diffsynth.configs.MODEL_CONFIGS:
        assert isinstance(e.get("model_hash"), str) and len(e["model_hash"]) == 32
    for e in ours:
        # our classes; converters ours, or DiffSynth's own for the tiny metric files (saved in the real formats)
        assert e["model_class"].startswith("artaug_ext.")
        assert e["state_dict_converter"].startswith(("artaug_ext.", "diffsynth.utils.state_dict_converters."))


def test_tiny_files_have_flux_dev_layout_and_registered_hashes():
    from diffsynth.core.loader.file import hash_model_file

    folder = tiny_folder()
    for rel in ("flux1-dev.safetensors", "ae.safetensors", "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "tokenizer_2/tokenizer.json", "artaug_tiny.json"):
        assert os.path.isfile(os.path.join(folder, rel)), rel
    hashes = {(e["model_name"], e["model_hash"]) for e in our_entries()}
    for name, rel in [("flux_dit", "flux1-dev.safetensors"), ("flux_vae_decoder", "ae.safetensors"),
                      ("flux_text_encoder_clip", "text_encoder/model.safetensors"),
                      ("flux_text_encoder_t5", "text_encoder_2/model.safetensors")]:
        assert (name, hash_model_file(os.path.join(folder, rel))) in hashes, rel
    # BFL key names, as in the real flux1-dev.safetensors
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "flux1-dev.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "double_blocks.0.img_attn.qkv.weight" in keys and "single_blocks.3.linear1.weight" in keys
    assert "double_blocks.0.txt_attn.norm.query_norm.scale" in keys
    with safe_open(os.path.join(folder, "ae.safetensors"), "pt") as f:
        assert "decoder.mid.attn_1.q.weight" in set(f.keys())


def test_keys_hash_matches_diffsynth_file_hash(tmp_path):
    from diffsynth.core.loader.file import hash_model_file
    from safetensors.torch import save_file

    sd = {"a.weight": torch.zeros(3, 2), "b": torch.zeros(5)}
    save_file(sd, str(tmp_path / "x.safetensors"))
    assert keys_hash({k: list(v.shape) for k, v in sd.items()}) == hash_model_file(str(tmp_path / "x.safetensors"))


def test_build_is_deterministic(tmp_path):
    from artaug_ext.files import sha256_file
    from artaug_ext.tiny.build import ensure_tiny_model

    a = ensure_tiny_model(TINY_RANDOM, str(tmp_path / "a"))
    b = tiny_folder()
    for rel in ("flux1-dev.safetensors", "ae.safetensors", "text_encoder_2/model.safetensors"):
        assert sha256_file(os.path.join(a, rel)) == sha256_file(os.path.join(b, rel))
    info = json.load(open(os.path.join(a, "artaug_tiny.json")))
    assert info["name"] == "tiny-random" and info["seed"] == 0


def test_incomplete_folder_is_rebuilt(tmp_path):
    from artaug_ext.tiny.build import ensure_tiny_model, is_complete

    folder = tmp_path / "artaug-ext" / "tiny-random"
    folder.mkdir(parents=True)
    (folder / "flux1-dev.safetensors").write_bytes(b"partial")
    assert not is_complete(str(folder))
    out = ensure_tiny_model(TINY_RANDOM, str(tmp_path))
    assert is_complete(out)
    assert os.path.getsize(os.path.join(out, "flux1-dev.safetensors")) > 1000


CAPTIONS = [
    "a red circle on a blue background",
    "a small yellow star in the top left on a dark green background, dim light",
    "Make the sky more vivid, with golden sunset light and sharper detail on the mountains.",
    "A large purple triangle at the bottom right, backlit, overexposed",
]


def test_tokenizers_cover_captions_without_unk():
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = tiny_folder()
    clip = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    t5 = T5TokenizerFast.from_pretrained(os.path.join(folder, "tokenizer_2"))
    assert t5.unk_token_id == 2 and t5.pad_token_id == 0 and t5.eos_token_id == 1
    for caption in CAPTIONS:
        ids = t5(caption).input_ids
        assert t5.unk_token_id not in ids, t5.convert_ids_to_tokens(ids)
        assert ids[-1] == t5.eos_token_id
        cids = clip(caption, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(cids) == 77
        # DiffSynth's CLIP encoder pools at argmax(input_ids): that must be the first end-of-text.
        assert cids.index(max(cids)) == cids.index(clip.eos_token_id)
        assert clip.unk_token_id not in cids[1:cids.index(clip.eos_token_id)]
        # scene words are single tokens
    assert len(t5.tokenize("a red circle on a blue background")) == 7


@pytest.fixture(scope="module")
def tiny_pipe():
    return artaug_ext.load_pipeline("tiny-random", device="cpu")


def test_pipeline_loads_through_diffsynth_hashing_loader(tiny_pipe):
    from diffsynth.core import ModelConfig
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    from artaug_ext.tiny.models import TinyFluxDiT, TinyFluxTextEncoderT5, TinyFluxVAEDecoder

    folder = tiny_folder()
    p = lambda rel: ModelConfig(path=os.path.join(folder, rel))
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[p("flux1-dev.safetensors"), p("text_encoder/model.safetensors"),
                       p("text_encoder_2/model.safetensors"), p("ae.safetensors")],
        tokenizer_1_config=p("tokenizer"), tokenizer_2_config=p("tokenizer_2"),
    )
    assert isinstance(pipe.dit, TinyFluxDiT) and isinstance(pipe.text_encoder_2, TinyFluxTextEncoderT5)
    assert isinstance(pipe.vae_decoder, TinyFluxVAEDecoder) and pipe.vae_encoder is not None
    # The weights DiffSynth loaded are the ones in the file.
    from safetensors.torch import load_file

    sd = load_file(os.path.join(folder, "flux1-dev.safetensors"))
    assert torch.equal(pipe.dit.blocks[1].attn.a_to_qkv.weight, sd["double_blocks.1.img_attn.qkv.weight"])
    assert torch.equal(pipe.dit.single_blocks[0].norm_q_a.weight, sd["single_blocks.0.norm.query_norm.scale"])
    image = pipe(prompt="a red circle", seed=0, num_inference_steps=2, height=64, width=64, t5_sequence_length=16,
                 progress_bar_cmd=lambda x: x)
    assert image.size == (64, 64)


def test_same_seed_same_image_different_prompt_different_image(tiny_pipe):
    gen = lambda prompt, seed: np.asarray(artaug_ext.generate(tiny_pipe, prompt, seed=seed, steps=3, height=64,
                                                              width=64, progress=False)).astype(np.int16)
    a = gen("a red circle on a blue background", 3)
    b = gen("a red circle on a blue background", 3)
    c = gen("a green star in the top left", 3)
    d = gen("a red circle on a blue background", 4)
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.5
    assert np.abs(a - d).mean() > 0.5


def test_fake_flux_dev_loads_through_hub(tmp_path):
    make_fake_flux_dev(str(tmp_path))
    pipe = artaug_ext.load_pipeline("flux-dev", model_dir=str(tmp_path), device="cpu", torch_dtype=torch.float32)
    assert isinstance(pipe.artaug_model_paths["text_encoder_2"], list)
    assert len(pipe.artaug_model_paths["text_encoder_2"]) == 2
    # The sharded T5 loads whole: its weights match the tiny one's.
    ref = artaug_ext.load_pipeline("tiny-random", device="cpu")
    for (n1, p1), (n2, p2) in zip(pipe.text_encoder_2.named_parameters(), ref.text_encoder_2.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_clip_tokenizer_is_identical_across_processes(tmp_path):
    import hashlib
    import subprocess
    import sys

    code = ("import sys, hashlib; from artaug_ext.tiny.tokenizers import build_clip_tokenizer as b; d=sys.argv[1]; b(d); "
            "print(hashlib.sha256(open(d+'/vocab.json','rb').read()+open(d+'/merges.txt','rb').read()).hexdigest())")
    digests = set()
    for i, seed in enumerate(("0", "12345")):  # different hash seeds: the trainer's old failure mode
        env = dict(os.environ, PYTHONHASHSEED=seed)
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / str(i))], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        digests.add(r.stdout.strip())
    assert len(digests) == 1
    here = hashlib.sha256(open(os.path.join(tiny_folder(), "tokenizer", "vocab.json"), "rb").read()
                          + open(os.path.join(tiny_folder(), "tokenizer", "merges.txt"), "rb").read()).hexdigest()
    assert digests == {here}
