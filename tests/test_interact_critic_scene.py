"""The heuristic critic on prompts of the scene grammar (issue 21, point 1): silent on faithful
renders, finds an altered object where the prompt put it, asks only for what the prompt says,
knows the words' looks (measured on training scenes) and not the renderer."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from artaug_ext import scenes
from artaug_ext.interact.critics import make_critic
from artaug_ext.interact.manifest import summarize
from artaug_ext.interact.parse import Suggestion, split_identities

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = load_script("critic_on_renders")
critic = make_critic("heuristic")
MULTI = bench.multi_object_scenes(100)


def test_exact_heldout_renders_get_almost_no_suggestions():
    heldout = bench.heldout_scenes(250)
    counts = bench.suggestion_counts(critic.critique, heldout)
    per_light = {}
    for scene, n in zip(heldout, counts, strict=True):
        per_light.setdefault(scene.lighting, []).append(n)
    assert sorted(per_light) == sorted(scenes.LIGHTINGS) and all(len(v) == 50 for v in per_light.values())
    for light, n in per_light.items():
        assert np.mean(n) <= 0.1, (light, np.mean(n))


def test_exact_multi_object_renders_get_almost_no_suggestions():
    assert all(len(s.objects) > 1 for s in MULTI)
    assert np.mean(bench.suggestion_counts(critic.critique, MULTI)) <= 0.1


@pytest.mark.parametrize("how", bench.ALTERATIONS)
def test_an_altered_object_is_found_where_the_prompt_put_it(how):
    assert bench.hit_rate(critic.critique, MULTI, how) >= 0.8
    # the measure has teeth: a critic that says nothing, or today's light meter, fails it
    assert bench.hit_rate(lambda im, p: critic._light_meter(im, p).__class__(), MULTI[:20], how) == 0.0
    assert bench.hit_rate(critic._light_meter, MULTI[:40], how) < 0.8


def test_the_box_check_and_the_alterations_are_what_they_say():
    scene = MULTI[0]
    for how in bench.ALTERATIONS:
        image, cov = bench.altered(scene, how, 0)
        changed = np.abs(np.asarray(image, dtype=int) - scenes.render(scene, bench.SIZE).astype(int)).sum(-1) > 0
        assert changed.any() and (cov[changed] > 0).all(), how  # only the picked object changed
    assert bench.covers((0, 0, 1, 1), cov) and not bench.covers((0, 0, 0.01, 0.01), cov)


def test_local_prompts_are_in_the_grammar_and_never_contradict_the_prompt():
    seen = 0
    for i, scene in enumerate(MULTI[:30]):
        for how in bench.ALTERATIONS:
            image, _ = bench.altered(scene, how, i)
            for s in critic.critique(image, scene.caption).suggestions:
                local = scenes.parse_caption(s.prompt)
                assert local is not None, s.prompt
                assert (local.background, local.background_style, local.lighting) == \
                       (scene.background, scene.background_style, scene.lighting), s.prompt
                assert all(o in scene.objects for o in local.objects), s.prompt
                assert s.category in ("composition", "atmosphere", "exposure", "detail"), s
                seen += 1
    assert seen >= 60


def test_a_dim_prompt_is_never_asked_for_more_light():
    scene = bench.heldout_scenes(1)[0]
    assert scene.lighting == "dim"
    bright = Image.fromarray(scenes.render(scenes.Scene(**{**scene.__dict__, "lighting": "normal"}), 256))
    found = critic.critique(bright, scene.caption).suggestions
    assert found and all("dim light" in s.prompt and "bright" not in s.prompt for s in found)
    assert any("brighter than 'dim light' implies" in s.rationale for s in found)


def test_speckles_at_an_object_edge_are_flagged():
    scene = scenes.parse_caption("a large red square in the center on a blue background")
    img = scenes.render(scene, 128).copy()
    clean = critic.critique(Image.fromarray(img).resize((256, 256), Image.NEAREST), scene.caption)
    assert clean.suggestions == []
    rng = np.random.default_rng(0)
    edge = np.zeros((128, 128), bool)
    edge[37:91, 36:39] = edge[37:91, 90:93] = True  # across the square's left and right edges
    img[edge & (rng.random((128, 128)) < 0.4)] = (255, 255, 255)  # isolated white pixels
    found = critic.critique(Image.fromarray(img).resize((256, 256), Image.NEAREST), scene.caption).suggestions
    assert any(s.category == "detail" and "speckles at the edge of the red square" in s.rationale for s in found)


def test_prompts_outside_the_grammar_and_empty_ones_keep_the_light_meter():
    image = Image.fromarray(scenes.render(MULTI[0], 96))
    for prompt in ("", "a photo of a cat", "a red square", "x"):
        assert critic.critique(image, prompt) == critic._light_meter(image, prompt)
    assert "outside" not in critic.critique(image, "").reason


def test_the_critic_knows_the_words_not_the_renderer(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the critic used the renderer")

    images = [(bench.altered(s, how, i)[0], s.caption) for i, s in enumerate(MULTI[:6]) for how in bench.ALTERATIONS]
    expected = [critic.critique(im, p) for im, p in images]
    for name in ("render", "shape_coverage", "background_image", "_apply_lighting", "lit_layers"):
        monkeypatch.setattr(scenes, name, forbidden)
    monkeypatch.setattr(scenes, "PALETTE", {})
    monkeypatch.setattr(scenes, "SIZES", {})
    assert [critic.critique(im, p) for im, p in images] == expected


def test_the_word_table_is_what_the_calibration_measures_on_training_scenes():
    calibrate = load_script("calibrate_critic")
    with open(calibrate.TABLE, encoding="utf-8") as f:
        shipped = json.load(f)
    assert shipped["source"].startswith("benchmarks/calibrate_critic.py: scenes.random_scene(seed, held_out=False)")
    assert len(shipped["regions"]) == len(scenes.POSITIONS) * len(scenes.SIZES)
    assert len(shipped["objects"]) == len(scenes.COLOURS) * len(scenes.LIGHTINGS)
    assert calibrate.main(["--check"]) == 0


def test_identity_suggestions_are_dropped_and_counted(tmp_path):
    prompt = "a red circle in the center on a blue background"
    same = Suggestion((0, 0, 1, 1), "  A red circle in the center  on a blue background")
    other = Suggestion((0, 0, 0.5, 0.5), "a red circle in the center on a blue background, dim light")
    usable, dropped = split_identities([same, other], prompt)
    assert usable == [other] and dropped == 1
    shards = tmp_path / "shards"
    shards.mkdir()
    records = [{"id": "a", "suggestions": [other.to_dict()], "identity_suggestions": 2, "enhanced": "x",
                "scores": {"original": {"quality": 0.1}, "enhanced": {"quality": 0.2}}, "kept": True},
               {"id": "b", "suggestions": [], "identity_suggestions": 1, "enhanced": None, "scores": {}, "kept": False}]
    (shards / "manifest-rank00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = summarize(str(tmp_path))
    assert (stats["suggestions"], stats["usable_suggestions"], stats["identity_suggestions"]) == (4, 1, 3)
