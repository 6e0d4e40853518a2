"""The shipped trained tiny model: package assets -> FLUX.1-dev file layout -> DiffSynth's
hashing loader -> a pipeline that draws what the prompt names."""

import os

import pytest
from safetensors import safe_open

import artaug_ext
from artaug_ext import analyse
from artaug_ext.cards import ALIASES
from artaug_ext.tiny.spec import SPECS, get_spec
from artaug_ext.tiny.trained import WEIGHT_FILES, asset_dir, has_assets


def test_assets_ship_fp16_and_small():
    folder = asset_dir("tiny")
    assert has_assets("tiny")
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    assert total <= 30 * 2**20
    with safe_open(os.path.join(folder, WEIGHT_FILES["dit"]), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())


def test_tiny_means_trained_and_random_stays():
    assert ALIASES["tiny"] == "tiny-v2" and get_spec("tiny") is SPECS["tiny-v2"]
    assert get_spec("tiny-random").weights_from is None
    assert get_spec("tiny").dit["dim"] // get_spec("tiny").dit["num_heads"] == 64  # head_dim 64


@pytest.fixture(scope="module")
def trained_pipe():
    return artaug_ext.load_pipeline("tiny", device="cpu")


def test_loads_through_diffsynth_hashing_loader(trained_pipe):
    import diffsynth.configs

    from artaug_ext.registry import keys_hash
    from artaug_ext.tiny.models import TinyFluxDiT, TinyFluxVAEDecoder

    pipe = trained_pipe
    assert isinstance(pipe.dit, TinyFluxDiT) and isinstance(pipe.vae_decoder, TinyFluxVAEDecoder)
    assert pipe.dit.x_embedder.out_features == SPECS["tiny-v2"].dit["dim"]
    with safe_open(pipe.artaug_model_paths["dit"], "pt") as f:
        h = keys_hash({k: f.get_slice(k).get_shape() for k in f.keys()})
    entries = [e for e in diffsynth.configs.MODEL_CONFIGS if e["model_hash"] == h]
    assert entries and entries[0].get("_artaug_ext") == "tiny-v2"


def test_draws_the_prompt_colours_bound_to_object_and_background(trained_pipe):
    from artaug_ext.pipeline import generate

    # The same words in both orders: a bag-of-words text encoder (tiny-v1's) cannot tell these
    # two prompts apart; the neighbour-reading T5 binds each colour to the word after it.
    for colour, background in (("red", "blue"), ("blue", "red")):
        prompt = f"a {colour} circle in the center on a {background} background"
        image = generate(trained_pipe, prompt, seed=1, progress=False)
        assert image.size == (256, 256)
        a = analyse.analyse(image)
        assert (a.colour, a.background) == (colour, background), (prompt, a)
        assert a.shape == "circle" and a.position == "center" and 0.02 < a.area < 0.5, (prompt, a)


def test_eval_tiny_rejects_non_positive_counts(capsys):
    from artaug_ext.cli import main

    for argv in (["-n", "0"], ["--steps", "-2"], ["--lighting-pairs", "x"]):
        with pytest.raises(SystemExit) as e:
            main(["eval-tiny", *argv])
        assert e.value.code == 2
    assert "must be positive" in capsys.readouterr().err
