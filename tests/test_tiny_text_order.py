"""The tiny T5 keeps word order (`TinyFluxTextEncoderT5.attend_to_neighbours`).

FLUX gives text tokens no positions, so unless the text encoder mixes each word with its
neighbours the DiT sees a bag of words and cannot tell "a red circle on a blue background"
from "a blue circle on a red background". Checked against transformers' own bucketing and
by what a changed word reaches."""

import pytest
import torch

from artaug_ext.tiny.models import TinyFluxTextEncoderT5
from artaug_ext.tiny.spec import SPECS


def _t5(neighbours: float | None):
    torch.manual_seed(0)
    t5 = TinyFluxTextEncoderT5(**SPECS["tiny-random"].t5).eval()
    if neighbours is not None:
        t5.attend_to_neighbours(neighbours)
    return t5


def test_bias_lands_on_the_previous_and_next_token():
    attention = _t5(8.0).encoder.block[0].layer[0].SelfAttention
    bias = attention.compute_bias(7, 7)[0]  # [heads, query, key], transformers' own bucketing
    expected = torch.zeros(2, 7, 7)
    for i in range(7):
        if i > 0:
            expected[0, i, i - 1] = 8.0
        if i < 6:
            expected[1, i, i + 1] = 8.0
    assert torch.equal(bias, expected)


def _reach(t5, position=6, length=16):
    """Relative change of every output token when the word at `position` changes."""
    ids = torch.arange(20, 20 + length)[None]
    other = ids.clone()
    other[0, position] = 400
    with torch.no_grad():
        a, b = t5(ids)[0], t5(other)[0]
    return ((a - b).norm(dim=-1) / a.norm(dim=-1)).tolist()


def test_a_word_reaches_two_neighbours_either_side_and_no_further():
    reach = _reach(_t5(8.0))
    assert min(reach[i] for i in (4, 5, 7, 8)) > 0.2, reach
    # (The first and last tokens have no word on one side: that head reads them all.)
    assert max(reach[i] for i in (2, 3, 9, 10, 11, 12, 13)) < 0.01, reach


def _swap_change(t5, i=2, j=9, length=12):
    ids = torch.arange(20, 20 + length)[None]
    swapped = ids.clone()
    swapped[0, [i, j]] = ids[0, [j, i]]
    with torch.no_grad():
        a, b = t5(ids)[0], t5(swapped)[0]
    return ((a - b).norm(dim=-1) / a.norm(dim=-1)).tolist()


def test_word_order_is_invisible_to_a_random_t5_and_visible_to_ours():
    # The untrained bias spreads attention evenly, so exchanging two words leaves every
    # other token as it was: why tiny-v1 swapped object and background colours.
    random_t5 = _swap_change(_t5(None))
    assert max(c for k, c in enumerate(random_t5) if k not in (2, 9)) < 0.1, random_t5
    ours = _swap_change(_t5(8.0))
    assert min(ours[k] for k in (1, 3, 8, 10)) > 0.3, ours


def test_needs_two_heads():
    torch.manual_seed(0)
    t5 = TinyFluxTextEncoderT5(d_model=32, num_layers=1, num_heads=1, d_kv=32, d_ff=64)
    with pytest.raises(ValueError, match="2 attention heads"):
        t5.attend_to_neighbours()
