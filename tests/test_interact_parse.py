"""parse_suggestions: every grounding convention we target, and garbage that must not raise."""

import json
import random

import pytest

from artaug_ext.interact import CATEGORIES, ParseResult, Suggestion, parse_suggestions


def boxes(result):
    return [tuple(round(v, 4) for v in s.box) for s in result.suggestions]


def test_qwen2_vl_tokens_on_1000_grid():
    text = ("Here are my suggestions:\n"
            "<|object_ref_start|>lighting: a warm golden sky<|object_ref_end|><|box_start|>(0,0),(999,380)<|box_end|>\n"
            "<|object_ref_start|>sharp detailed grass<|object_ref_end|><|box_start|>(100, 600),(500,1000)<|box_end|>")
    r = parse_suggestions(text, (512, 256))
    assert r.reason == ""
    assert boxes(r) == [(0.0, 0.0, 0.999, 0.38), (0.1, 0.6, 0.5, 1.0)]
    assert [s.prompt for s in r.suggestions] == ["a warm golden sky", "sharp detailed grass"]
    assert r.suggestions[0].category == "lighting"
    assert r.suggestions[1].category == "detail"  # inferred from the prompt's words


def test_qwen2_vl_stripped_tokens():
    r = parse_suggestions("the sky(0,0),(999,380) and the tree(500,1000),(100,600)", (64, 64))
    assert [s.prompt for s in r.suggestions] == ["the sky", "the tree"]
    assert boxes(r) == [(0.0, 0.0, 0.999, 0.38), (0.1, 0.6, 0.5, 1.0)]  # corners reordered


def test_glm_v_box_tokens():
    text = "1. exposure: softer light on the face <|begin_of_box|>[250,100,750,500]<|end_of_box|>\n2. vivid flowers <|begin_of_box|>[0,700,1000,1000]<|end_of_box|>"
    r = parse_suggestions(text, (300, 200))
    assert [s.prompt for s in r.suggestions] == ["softer light on the face", "vivid flowers"]
    assert r.suggestions[0].category == "exposure"
    assert boxes(r) == [(0.25, 0.1, 0.75, 0.5), (0.0, 0.7, 1.0, 1.0)]


    assert boxes(r) == [(0.25, 0.1, 0.75, 0.5), (0.0, 0.7, 1.0, 1.0)]


def test_glm_45v_double_bracket_boxes():
    # GLM-4.5V / 4.6V answer `[[x0,y0,x1,y1]]` (several boxes: `[[...],[...]]`); single brackets still work.
    text = ("warmer light on the bottles <|begin_of_box|>[[94,598,177,991]]<|end_of_box|>.\n"
            "detail: crisp leaves <|begin_of_box|>[[0,0,500,250],[500,0,1000,250]]<|end_of_box|>")
    r = parse_suggestions(text, (300, 200))
    assert [s.prompt for s in r.suggestions] == ["warmer light on the bottles", "crisp leaves", "crisp leaves"]
    assert r.suggestions[1].category == "detail" and r.reason == ""
    assert boxes(r) == [(0.094, 0.598, 0.177, 0.991), (0.0, 0.0, 0.5, 0.25), (0.5, 0.0, 1.0, 0.25)]


def test_bbox_2d_absolute_pixels_in_fence():
    text = 'Sure!\n```json\n[{"bbox_2d": [28, 56, 280, 140], "label": "bright sunlight", "category": "Lighting"}]\n```'
    r = parse_suggestions(text, (280, 280))
    assert boxes(r) == [(0.1, 0.2, 1.0, 0.5)]
    assert r.suggestions[0].category == "lighting"


def test_bbox_2d_rel1000_for_qwen3():
    r = parse_suggestions('{"bbox_2d": [100, 200, 500, 800], "prompt": "misty mountains"}', (1920, 1080), coords="rel1000")
    assert boxes(r) == [(0.1, 0.2, 0.5, 0.8)]


def test_plain_json_normalised_box_and_wrapper_object():
    text = json.dumps({"suggestions": [
        {"box": [0.1, 0.1, 0.4, 0.4], "prompt": "a crisp red circle", "category": "detail", "rationale": "blurry"},
        {"box": [0.5, 0.5, 0.9, 0.9], "prompt": "dim warm light", "category": "weird-category"},
    ]})
    r = parse_suggestions(text, (100, 100))
    assert boxes(r) == [(0.1, 0.1, 0.4, 0.4), (0.5, 0.5, 0.9, 0.9)]
    assert r.suggestions[0].rationale == "blurry"
    assert r.suggestions[1].category == "lighting"  # unknown name -> inferred from the prompt
    assert all(s.category in CATEGORIES for s in r.suggestions)


def test_single_object_and_many():
    one = parse_suggestions('{"box": [0, 0, 1, 1], "prompt": "x"}', (10, 10))
    assert len(one.suggestions) == 1
    many = parse_suggestions(json.dumps([{"box": [0, 0, 0.5, 0.5], "prompt": f"p{i}"} for i in range(7)]), (10, 10),
                             max_suggestions=3)
    assert [s.prompt for s in many.suggestions] == ["p0", "p1", "p2"] and "first 3 of 7" in many.reason


def test_clamp_reorder_and_drop():
    text = json.dumps([
        {"bbox_2d": [-20, -5, 150, 50], "label": "clamped"},
        {"bbox_2d": [90, 80, 10, 20], "label": "swapped"},
        {"bbox_2d": [10, 10, 10, 50], "label": "empty width"},
        {"bbox_2d": [200, 200, 300, 300], "label": "outside"},
        {"bbox_2d": [0, 0, 50, 50], "label": "   "},
        {"bbox_2d": [0, 0, "x", 50], "label": "bad number"},
        {"bbox_2d": [0, 0, 50], "label": "three numbers"},
    ])
    r = parse_suggestions(text, (100, 100))
    assert boxes(r) == [(0.0, 0.0, 1.0, 0.5), (0.1, 0.2, 0.9, 0.8)]
    assert "malformed or empty box" in r.reason and "empty prompt" in r.reason


@pytest.mark.parametrize("text", [
    "", "   ", "no boxes here, the image is fine", "[" * 100_000, "{\"a\":" * 50_000,
    '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "trunc', '[{"bbox_2d": [1,2,3,4], "label": "x"}, {"bbox_2d": [5,',
    "<|box_start|>(1,2),(3<|box_end|>", "<|begin_of_box|>[1,2]<|end_of_box|>", '{"bbox_2d": [NaN, 0, 1, 1], "label": "n"}',
    "\x00\xff\ufffd" * 1000, "(" * 10_000 + "1,2),(3,4)", json.dumps({"suggestions": "nope"}), "null", "42",
], ids=lambda t: repr(t[:20]))
def test_garbage_returns_reason_never_raises(text):
    r = parse_suggestions(text, (64, 64))
    assert isinstance(r, ParseResult)
    assert r.suggestions == [] and r.reason


def test_not_text_and_bad_size():
    assert parse_suggestions(None, (64, 64)).reason
    assert parse_suggestions(b"bytes", (64, 64)).reason
    assert parse_suggestions('{"box":[0,0,1,1],"prompt":"x"}', (0, 64)).reason
    assert parse_suggestions('{"box":[0,0,1,1],"prompt":"x"}', "64").reason


def test_random_fuzz_never_raises():
    rng = random.Random(0)
    pieces = ["<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "(", ")", ",", "[", "]",
              "{", "}", '"bbox_2d"', ":", "12", "999", "-3", "sky", "```json", "```", "<|begin_of_box|>", "\n", '"label"']
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        r = parse_suggestions(text, (rng.randint(1, 2000), rng.randint(1, 2000)))
        for s in r.suggestions:
            x0, y0, x1, y1 = s.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and s.prompt.strip()


def test_round_trip_dict():
    s = Suggestion((0.1, 0.2, 0.3, 0.4), "vivid red", "atmosphere", "dull")
    r = ParseResult([s], "")
    assert ParseResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_coords_applies_to_bbox_2d_only():
    text = ('[{"bbox_2d": [100, 100, 500, 500], "label": "a"}, {"box": [0.1, 0.1, 0.5, 0.5], "prompt": "b"}]'
            " c(100,100),(500,500)")
    r = parse_suggestions(text, (1000, 500), coords="rel1000")
    assert boxes(r) == [(0.1, 0.1, 0.5, 0.5), (0.1, 0.1, 0.5, 0.5)]
    r = parse_suggestions(text, (1000, 500))
    assert boxes(r) == [(0.1, 0.2, 0.5, 1.0), (0.1, 0.1, 0.5, 0.5)]
    glm = parse_suggestions("sky <|begin_of_box|>[0,0,500,500]<|end_of_box|>", (64, 64), coords="abs")
    assert boxes(glm) == [(0.0, 0.0, 0.5, 0.5)]


def test_unknown_coords_convention_is_a_caller_error():
    with pytest.raises(ValueError, match="coords='rel100'"):
        parse_suggestions('{"bbox_2d": [1, 2, 3, 4], "label": "x"}', (64, 64), coords="rel100")
