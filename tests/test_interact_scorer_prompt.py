"""The filter reads the prompt too (issue 21, point 2): the heuristic scorer's quality judges an
image against its prompt's lighting word, its alignment reads every attribute the analyser reads,
lighting included, and the filter rejects a pair whose enhancement changes what the prompt asks."""

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image

from artaug_ext import colours, scenes
from artaug_ext.eval.prompts import read_prompt_set
from artaug_ext.interact import scorers
from artaug_ext.interact.keep import FilterConfig, keep_pair
from artaug_ext.recipe.config import FilterSection

HELD = [item.scene for item in read_prompt_set("tiny-heldout-lit:100")]  # 20 per lighting
SCORER = scorers.HeuristicScorer()


def render(scene, **change):
    return Image.fromarray(scenes.render(dataclasses.replace(scene, **change), 256))


def test_the_faithful_lighting_scores_at_least_the_normal_light_render_of_the_same_scene():
    faithful, normal = {}, {}
    for s in HELD:
        faithful.setdefault(s.lighting, []).append(SCORER.score([render(s)], s.caption)[0]["quality"])
        normal.setdefault(s.lighting, []).append(SCORER.score([render(s, lighting="normal")], s.caption)[0]["quality"])
    assert sorted(faithful) == sorted(scenes.LIGHTINGS)
    for light in scenes.LIGHTINGS:
        assert np.mean(faithful[light]) >= np.mean(normal[light]), light
        assert np.mean(faithful[light]) >= 0.99, light  # a faithful render is (nearly) as good as it gets
    for light in ("dim", "overexposed"):  # and the normal-light render is worse where it visibly differs
        assert np.mean(normal[light]) < np.mean(faithful[light]) - 0.05, light


def test_alignment_reads_the_lighting_and_colours_of_the_prompt():
    for s in HELD[:25]:
        row = SCORER.score([render(s)], s.caption)[0]
        other = next(light for light in ("overexposed", "dim") if light != s.lighting)
        relit = SCORER.score([render(s, lighting=other)], s.caption)[0]
        assert relit["prompt_match"] < row["prompt_match"], (s.caption, other)
        colour = next(c for c in scenes.COLOURS if c not in (s.main.colour, s.background))
        recoloured = render(s, objects=[dataclasses.replace(s.main, colour=colour)])
        assert SCORER.score([recoloured], s.caption)[0]["colour_match"] < row["colour_match"], s.caption


@pytest.mark.parametrize("change", ["lighting", "colour"])
def test_a_pair_whose_enhancement_changes_what_the_prompt_asks_for_is_rejected(change):
    shipped = FilterConfig(alignment_tolerance=FilterSection().alignment_tolerance)
    assert shipped.alignment_tolerance == FilterConfig().alignment_tolerance
    # margin -1: every pair passes the quality gate (quality is in [0, 1]), so only alignment decides
    cfg = dataclasses.replace(shipped, margin=-1.0)
    rejected = 0
    for s in HELD[:20]:
        original = SCORER.score([render(s)], s.caption)[0]
        if change == "lighting":
            enhanced = render(s, lighting="normal" if s.lighting != "normal" else "dim")
        else:
            colour = next(c for c in scenes.COLOURS if c not in (s.main.colour, s.background))
            enhanced = render(s, objects=[dataclasses.replace(s.main, colour=colour)])
        keep, why, _ = keep_pair(original, SCORER.score([enhanced], s.caption)[0], SCORER, cfg)
        rejected += not keep and "text alignment" in why
        assert keep_pair(original, original, SCORER, cfg)[0]  # the same image is kept: alignment decided
    assert rejected == 20


def test_prompts_outside_the_grammar_keep_todays_scores():
    image = render(HELD[0])
    for prompt in ("a photo of a red cat", "", "a red square"):
        row = SCORER.score([image], prompt)[0]
        assert row["quality"] == round(SCORER.quality(image, ""), 6)
        assert row["colour_match"] == SCORER.colour_match(image, prompt)
        assert math.isnan(row["prompt_match"])
    # and a pair on such a prompt is not judged on the score it cannot measure
    a, b = {"quality": 0.5, "colour_match": 1.0, "prompt_match": math.nan}, {"quality": 0.6, "colour_match": 1.0,
                                                                             "prompt_match": math.nan}
    assert keep_pair(a, b, SCORER, FilterConfig())[0]
    assert not keep_pair(a, dict(b, prompt_match=1.0), SCORER, FilterConfig())[0]  # one side unmeasured: refused


def test_the_scorer_knows_the_words_not_the_renderer(monkeypatch):
    images = [(render(s), s.caption) for s in HELD[:10]] + [(render(s, lighting="dim"), s.caption) for s in HELD[:5]]
    expected = [SCORER.score([im], p) for im, p in images]

    def forbidden(*args, **kwargs):
        raise AssertionError("the scorer used the renderer or the palette")

    for name in ("render", "shape_coverage", "background_image", "_apply_lighting", "lit_layers"):
        monkeypatch.setattr(scenes, name, forbidden)
    monkeypatch.setattr(scenes, "PALETTE", {})
    monkeypatch.setattr(scenes, "SIZES", {})
    monkeypatch.setattr(colours, "COLOURS", {})
    monkeypatch.setattr(scorers, "COLOURS", {})
    monkeypatch.setattr(scorers, "rgb255", forbidden)
    assert [SCORER.score([im], p) for im, p in images] == expected
