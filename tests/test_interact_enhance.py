"""Regional enhancement: masks, blur, one batched DiT call per step equal to the sequential blend."""

import numpy as np
import pytest
import torch

from artaug_ext.interact.enhance import (
    DEFAULT_REGION_SCALE,
    RegionalModelFn,
    blend,
    blur_params,
    box_masks,
    enhance,
    gaussian_blur,
    prepare_regions,
    regional_prompts,
)
from artaug_ext.interact.parse import Suggestion
from artaug_ext.pipeline import generate, t5_sequence_length

SUGG = [Suggestion((0.0, 0.0, 0.5, 0.5), "bright light, vivid red colors in the top left", "lighting"),
        Suggestion((0.3, 0.4, 1.0, 1.0), "dim light, blue shadows in the bottom right", "lighting"),
        Suggestion((0.6, 0.0, 0.9, 0.3), "sharp crisp details", "detail")]
SIZE, STEPS = 128, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # and `pipe`: tests/conftest.py


@pytest.mark.parametrize("side,expected", [(128, (33, 10.0)), (256, (33, 10.0)), (64, (17, 5.0)), (32, (9, 2.5)),
                                           (16, (5, 1.25)), (4, (3, 0.3125)), (3, (3, 10 * 3 / 128))])
def test_blur_params_scale_below_128(side, expected):
    kernel, sigma = blur_params(side, side * 2)
    assert kernel == expected[0] and sigma == pytest.approx(expected[1])
    assert kernel % 2 == 1 and 3 <= kernel <= side


def test_blur_params_tiny_latent_has_no_blur():
    assert blur_params(2, 2)[0] == 1
    m = box_masks([(0, 0, 0.5, 0.5)], 2, 2)
    assert m[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_box_mask_rounds_outward_at_latent_resolution():
    m = box_masks([(0.1, 0.1, 0.52, 0.5)], 16, 16, blur=False)[0, 0]
    rows, cols = torch.nonzero(m, as_tuple=True)
    assert (rows.min().item(), rows.max().item()) == (1, 7)  # floor(1.6)=1 .. ceil(8.0)=8 exclusive
    assert (cols.min().item(), cols.max().item()) == (1, 8)  # .. ceil(8.32)=9 exclusive
    assert m.sum().item() == 7 * 8


def test_box_mask_edges_on_cell_boundaries_survive_float_error():
    # 0.07 * 100 = 7.000000000000001 and 0.29 * 100 = 28.999999999999996 in floats: a plain
    # ceil/floor would widen these boxes by one latent column (an 800px image, 100 wide).
    m = box_masks([(0.29, 0.0, 0.56, 1.0), (0.0, 0.0, 0.07, 1.0)], 4, 100, blur=False)[:, 0, 0]
    assert torch.nonzero(m[0]).flatten().tolist() == list(range(29, 56))
    assert torch.nonzero(m[1]).flatten().tolist() == list(range(0, 7))


def test_gaussian_blur_matches_reference_and_keeps_range():
    m = box_masks([(0.25, 0.25, 0.75, 0.75)], 32, 32, blur=False)
    k, s = blur_params(32, 32)
    b = gaussian_blur(m, k, s)
    assert b.min() >= 0 and b.max() <= 1 and torch.allclose(b, b.flip(-1), atol=1e-6)
    torchvision = pytest.importorskip("torchvision.transforms.functional")
    ref = torchvision.gaussian_blur(m, [k, k], [s, s])
    assert torch.allclose(b, ref, atol=1e-6)


def test_blend_formula():
    g = torch.ones(1, 2, 2, 2)
    r = torch.stack([torch.full((2, 2, 2), 3.0), torch.full((2, 2, 2), -1.0)])
    w = torch.tensor([2.0, 1.0]).view(2, 1, 1, 1) * torch.ones(2, 1, 2, 2)
    assert torch.allclose(blend(g, r, w), torch.full((1, 2, 2, 2), (1 + 6 - 1) / 4))


def _captured_step_inputs(pipe, prompt, steps=STEPS):
    """model_fn keyword arguments of every step of a plain generation."""
    calls, original = [], pipe.model_fn

    def spy(**kw):
        calls.append(dict(kw))
        return original(**kw)

    pipe.model_fn = spy
    try:
        generate(pipe, prompt, seed=3, steps=steps, height=SIZE, width=SIZE, progress=False)
    finally:
        pipe.model_fn = original
    return calls


def test_batched_equals_region_by_region_fp32(pipe):
    prompt = "a red circle on a blue background"
    L = t5_sequence_length("tiny-random")
    regions = prepare_regions(pipe, SUGG, SIZE, SIZE, L, scale=[1.0, 2.5, 0.5])
    steps = _captured_step_inputs(pipe, prompt)
    global_emb = steps[0]["prompt_emb"]
    with torch.no_grad():
        for kw in steps:
            batched = RegionalModelFn(pipe.model_fn, regions, global_emb, batched=True)(**kw)
            sequential = RegionalModelFn(pipe.model_fn, regions, global_emb, batched=False)(**kw)
            # reference written out longhand: one model call per prompt, then the paper's formula
            g = pipe.model_fn(**kw)
            num, den = g.clone(), torch.ones_like(g[:, :1])
            for i in range(len(SUGG)):
                kwi = dict(kw, prompt_emb=regions.prompt_emb[i:i + 1], pooled_prompt_emb=regions.pooled_prompt_emb[i:i + 1],
                           text_ids=regions.text_ids[i:i + 1])
                w = regions.scales[i] * regions.masks[i:i + 1]
                num, den = num + w * pipe.model_fn(**kwi), den + w
            ref = num / den
            assert batched.dtype == torch.float32 and batched.shape == g.shape
            assert (batched - sequential).abs().max().item() < 1e-5
            assert (batched - ref).abs().max().item() < 1e-5
            assert (batched - g).abs().max().item() > 1e-4  # the regions do change the prediction


def test_one_batched_dit_call_per_step_and_restore(pipe):
    L = t5_sequence_length("tiny-random")
    batches, original = [], pipe.model_fn

    def counting(**kw):
        batches.append(kw["latents"].shape[0])
        return original(**kw)

    pipe.model_fn = counting
    try:
        with regional_prompts(pipe, "a red circle", SUGG, height=SIZE, width=SIZE, t5_sequence_length=L) as wrapper:
            assert pipe.model_fn is wrapper
            pipe(prompt="a red circle", seed=1, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                 t5_sequence_length=L, progress_bar_cmd=lambda x: x)
        assert pipe.model_fn is counting  # restored
        assert batches == [1 + len(SUGG)] * STEPS and wrapper.calls == STEPS
        # CFG: only the positive side is blended, the negative side passes through at batch 1
        batches.clear()
        with regional_prompts(pipe, "a red circle", SUGG, height=SIZE, width=SIZE, t5_sequence_length=L):
            pipe(prompt="a red circle", negative_prompt="blurry", cfg_scale=2.0, seed=1, num_inference_steps=2,
                 height=SIZE, width=SIZE, t5_sequence_length=L, progress_bar_cmd=lambda x: x)
        assert batches == [1 + len(SUGG), 1] * 2
        with pytest.raises(RuntimeError, match="boom"):
            with regional_prompts(pipe, "x", SUGG, height=SIZE, width=SIZE, t5_sequence_length=L):
                raise RuntimeError("boom")
        assert pipe.model_fn is counting
    finally:
        pipe.model_fn = original


def test_enhance_same_seed_and_no_regions_is_plain_generation(pipe):
    L = t5_sequence_length("tiny-random")
    plain = generate(pipe, "a green square", seed=5, steps=2, height=SIZE, width=SIZE, progress=False)
    same = enhance(pipe, "a green square", [], seed=5, steps=2, height=SIZE, width=SIZE, t5_sequence_length=L)
    assert np.array_equal(np.asarray(plain), np.asarray(same))
    changed = enhance(pipe, "a green square", SUGG, seed=5, steps=2, height=SIZE, width=SIZE, t5_sequence_length=L,
                      scale=4.0)
    assert changed.size == plain.size and not np.array_equal(np.asarray(plain), np.asarray(changed))
    assert DEFAULT_REGION_SCALE > 0


def test_unsupported_features_raise(pipe):
    L = t5_sequence_length("tiny-random")
    regions = prepare_regions(pipe, SUGG[:1], SIZE, SIZE, L)
    kw = _captured_step_inputs(pipe, "x", steps=1)[0]
    fn = RegionalModelFn(pipe.model_fn, regions, kw["prompt_emb"])
    with pytest.raises(ValueError, match="entity_prompt_emb"):
        fn(**dict(kw, entity_prompt_emb=torch.zeros(1)))
