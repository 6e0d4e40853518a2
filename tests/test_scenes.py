"""Procedural scenes: deterministic, grammatical, held-out combinations kept out of training,
and every caption word known to both tiny tokenizers."""

import numpy as np
import pytest

from artaug_ext import scenes


def test_same_seed_same_scene_and_pixels():
    a_img, a_cap, a = scenes.make_scene(123, 64)
    b_img, b_cap, b = scenes.make_scene(123, 64)
    assert a_cap == b_cap and a.to_dict() == b.to_dict()
    assert np.array_equal(a_img, b_img)
    assert scenes.make_scene(124, 64)[1] != a_cap or not np.array_equal(scenes.make_scene(124, 64)[0], a_img)


def test_caption_follows_the_grammar_and_structure():
    words = set(scenes.caption_words())
    seen_counts, seen_lighting, seen_styles = set(), set(), set()
    for seed in range(300):
        s = scenes.random_scene(seed, held_out=None)
        assert s.caption == scenes.describe(s)
        assert set(s.caption.replace(",", "").split()) <= words, s.caption
        assert 1 <= len(s.objects) <= 3 and all(o.colour != s.background for o in s.objects)
        assert s.caption.startswith(("a ", "an ")) and " background" in s.caption
        main = s.main
        assert f"{main.colour} {main.shape} {scenes.POSITION_PHRASES[main.position]}" in s.caption
        seen_counts.add(len(s.objects))
        seen_lighting.add(s.lighting)
        seen_styles.add(s.background_style)
    assert seen_counts == {1, 2, 3}
    assert seen_lighting == set(scenes.LIGHTINGS)
    assert seen_styles == set(scenes.BACKGROUND_STYLES)
    assert len(scenes.COLOURS) >= 8 and set(scenes.SHAPES) == {"circle", "square", "triangle", "star"}


def test_example_captions():
    s = scenes.Scene([scenes.ShapeSpec("red", "circle", "center")], background="blue", say_lighting=False)
    assert scenes.describe(s) == "a red circle in the center on a blue background"
    s = scenes.Scene([scenes.ShapeSpec("yellow", "star", "top left", "small")], background="green",
                     background_style="dark", lighting="dim")
    assert scenes.describe(s) == "a small yellow star in the top left on a dark green background, dim light"


def test_held_out_combinations_never_in_training():
    for seed in range(400):
        s = scenes.random_scene(seed)
        assert not any(scenes.is_held_out(o.colour, o.shape, o.position, s.background) for o in s.objects)
    for i in range(20):
        h = scenes.held_out_scene(i)
        assert len(h.objects) == 1 and scenes.is_held_out(h.main.colour, h.main.shape, h.main.position, h.background)


def test_lighting_moves_brightness():
    base = scenes.held_out_scene(0)
    means = {}
    for light in scenes.LIGHTINGS:
        s = scenes.held_out_scene(0, light)
        assert s.main == base.main
        means[light] = scenes.render(s, 64).mean()
    assert means["dim"] < means["normal"] < means["bright"] < means["overexposed"]


def _tokenizers(folder):
    from transformers import CLIPTokenizer, T5TokenizerFast

    return CLIPTokenizer.from_pretrained(f"{folder}/tokenizer"), T5TokenizerFast.from_pretrained(f"{folder}/tokenizer_2")


@pytest.mark.parametrize("which", ["built", "shipped"])
def test_every_caption_word_tokenizes_without_unk(tmp_path, which):
    from artaug_ext.tiny.tokenizers import build_clip_tokenizer, build_t5_tokenizer
    from artaug_ext.tiny.trained import asset_dir

    if which == "built":
        build_clip_tokenizer(str(tmp_path / "tokenizer"))
        build_t5_tokenizer(str(tmp_path / "tokenizer_2"))
        folder = str(tmp_path)
    else:
        folder = asset_dir("tiny")
    clip, t5 = _tokenizers(folder)
    text = " ".join(scenes.caption_words()) + " , " + " ".join(scenes.random_scene(s).caption for s in range(20))
    assert t5.unk_token_id not in t5(text).input_ids
    # CLIP's unk is its end-of-text token: it may only appear once, at the end.
    ids = clip(text, truncation=False).input_ids
    assert clip.unk_token_id not in ids[1:-1]
    for word in scenes.caption_words():  # each grammar word is one whole-word token
        assert len(clip(word).input_ids) == 3, word
