"""The caption-fidelity analyser: right on rendered scenes, about chance on noise."""

import numpy as np

from artaug_ext import analyse, colours, scenes


def test_accuracy_on_rendered_ground_truth():
    held = [scenes.held_out_scene(i, light) for i in range(40) for light in ("normal", "dim")]
    train = [scenes.random_scene(50_000 + i) for i in range(80)]  # all lightings, styles, 1-3 objects
    for group in (held, train):
        acc = analyse.accuracy([scenes.render(s, 128) for s in group], group)
        assert min(acc.values()) >= 0.95, acc


def test_analyser_works_at_other_sizes_and_on_pil_images():
    from PIL import Image

    s = scenes.held_out_scene(3)
    a = analyse.analyse(Image.fromarray(scenes.render(s, 256)), s)  # lighting is read against the words
    assert analyse.matches(a, s) == {k: True for k in analyse.ATTRIBUTES}
    assert 0 < a.area < 0.5 and 0 <= a.brightness <= 1


def test_about_chance_on_noise():
    rng = np.random.default_rng(0)
    group = [scenes.held_out_scene(i) for i in range(60)]
    noise = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in group]
    acc = analyse.accuracy(noise, group)
    chance = analyse.chance_rates()
    for k in analyse.ATTRIBUTES:
        assert acc[k] <= chance[k] + 0.2, (k, acc[k])


def test_plain_image_has_no_object():
    a = analyse.analyse(np.full((64, 64, 3), (30, 70, 220), dtype=np.uint8))
    assert a.background == "blue" and a.colour is None and a.shape is None


def test_lighting_is_read_on_renders_of_every_lighting():
    from artaug_ext.eval.prompts import read_prompt_set

    held = [item.scene for item in read_prompt_set("tiny-heldout-lit:100")]  # 20 per lighting
    train = [scenes.random_scene(60_000 + i) for i in range(100)]  # styles, 1-3 objects; not calibration seeds
    for group in (held, train):
        got = [analyse.analyse(scenes.render(s, 256), s).lighting for s in group]
        for light in scenes.LIGHTINGS:
            pairs = [(g, s.lighting) for g, s in zip(got, group, strict=True) if s.lighting == light]
            assert pairs and np.mean([g == w for g, w in pairs]) >= 0.9, (light, pairs)
    # without the prompt's words no lighting is read; a relit render reads as its new lighting
    s = held[0]
    assert analyse.analyse(scenes.render(s, 256)).lighting is None
    for light in scenes.LIGHTINGS:
        relit = scenes.Scene(**{**s.__dict__, "lighting": light})
        assert analyse.analyse(scenes.render(relit, 256), s).lighting == light


def test_the_analyser_knows_the_words_not_the_renderer(monkeypatch):
    group = [scenes.random_scene(70_000 + i) for i in range(12)]
    images = [scenes.render(s, 128) for s in group]
    expected = [analyse.analyse(im, s) for im, s in zip(images, group, strict=True)]

    def forbidden(*args, **kwargs):
        raise AssertionError("the analyser used the renderer")

    for name in ("render", "shape_coverage", "background_image", "_apply_lighting", "lit_layers"):
        monkeypatch.setattr(scenes, name, forbidden)
    monkeypatch.setattr(scenes, "PALETTE", {})
    monkeypatch.setattr(scenes, "SIZES", {})
    monkeypatch.setattr(colours, "COLOURS", {})
    analyse._colour_looks.cache_clear()  # nothing of the palette may be cached either
    got = [analyse.analyse(im, s) for im, s in zip(images, group, strict=True)]
    assert [a.to_dict() for a in got] == [a.to_dict() for a in expected]
