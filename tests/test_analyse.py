"""The caption-fidelity analyser: right on rendered scenes, about chance on noise."""

import numpy as np

from artaug_ext import analyse, scenes


def test_accuracy_on_rendered_ground_truth():
    held = [scenes.held_out_scene(i, light) for i in range(40) for light in ("normal", "dim")]
    train = [scenes.random_scene(50_000 + i) for i in range(80)]  # all lightings, styles, 1-3 objects
    for group in (held, train):
        acc = analyse.accuracy([scenes.render(s, 128) for s in group], group)
        assert min(acc.values()) >= 0.95, acc


def test_analyser_works_at_other_sizes_and_on_pil_images():
    from PIL import Image

    s = scenes.held_out_scene(3)
    a = analyse.analyse(Image.fromarray(scenes.render(s, 256)))
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
