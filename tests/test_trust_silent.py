"""Nothing silent: results that would be wrong raise, with the thing named.

Each case here once "worked" and produced a wrong result: a merge that wrote Inf or NaN and
reported success, a NaN guidance that wrote a black image, sizes silently rounded, zero steps,
an empty combined LoRA, a prompt cut without a word."""

import logging

import pytest
import torch
from artaug_kernels import lora_merge as lm

import artaug_ext
from artaug_ext.errors import NonFiniteError, UsageError
from artaug_ext.lora import combine_loras, load_lora, unload_lora
from artaug_ext.lora.merge import LoRAMergeError
from artaug_ext.tiny.models import TinyFluxDiT

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["interpreter", "torch"])
def path(request, monkeypatch):
    """The interpreter kernel (the GPU kernel's code) or the plain-torch CPU path."""
    if request.param == "torch":
        monkeypatch.setattr(lm, "interpreter_mode", lambda: False)
    return request.param


def _huge(n, m, kind):
    """Finite factors whose product overflows fp32: all one way (Inf) or in opposite directions (Inf - Inf = NaN)."""
    a = torch.full((2, m), 1e20)
    b = torch.full((n, 2), 1e20)
    if kind == "nan":
        a[1] = -1e20
    return a, b


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_raw_merge_detects_inf_and_nan_in_every_dtype_and_path(path, dtype, kind):
    w = torch.randn(40, 24).to(dtype)
    a, b = _huge(40, 24, kind)
    with pytest.raises(lm.LoRAMergeOverflowError, match="now hold them") as e:
        lm.lora_merge_(w, a, b, 1.0)
    assert e.value.layers == [0]
    assert not torch.isfinite(w).all()  # the raw kernel is in place and says so
    # grouped: only the bad layer is named
    good, bad = torch.zeros(8, 24).to(dtype), torch.randn(40, 24).to(dtype)
    small_a, small_b = torch.ones(1, 24) * 1e-3, torch.ones(8, 1) * 1e-3
    with pytest.raises(lm.LoRAMergeOverflowError) as e:
        lm.lora_merge_grouped_([good, bad], [[(small_a, small_b, 1.0)], [(a, b, 1.0)]])
    assert e.value.layers == [1]


def test_fp32_overflow_is_not_hidden_by_the_in_place_update(path):
    """The fault-tour case: fp32 weight, factors 1e20: every element overflows, and the old
    torch path compared the overflowed values with themselves and reported success."""
    w = torch.randn(512, 512)
    a, b = _huge(512, 512, "inf")
    with pytest.raises(lm.LoRAMergeOverflowError):
        lm.lora_merge_(w, a, b, 1.0)


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_load_lora_restores_exactly_and_names_the_layer(path, dtype, kind):
    torch.manual_seed(0)
    dit = TinyFluxDiT(dim=64, num_heads=1, axes_dim=(16, 24, 24)).to(dtype)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    a, b = _huge(64, 64, kind)
    ok_a, ok_b = torch.randn(2, 64) * 0.01, torch.randn(192, 2) * 0.01
    sd = {"blocks.0.attn.a_to_qkv.lora_A.weight": ok_a, "blocks.0.attn.a_to_qkv.lora_B.weight": ok_b,
          "blocks.1.attn.a_to_out.lora_A.weight": a, "blocks.1.attn.a_to_out.lora_B.weight": b}
    with pytest.raises(LoRAMergeError, match=r"NaN or Inf in 1 layer\(s\): dit:blocks.1.attn.a_to_out; "
                                             "every weight was restored") as e:
        load_lora(dit, sd)
    assert e.value.layers == ["dit:blocks.1.attn.a_to_out"]
    assert isinstance(e.value, NonFiniteError) and isinstance(e.value, lm.LoRAMergeOverflowError)
    for k, v in dit.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert artaug_ext.lora.merge.loaded_loras(dit) == []


def test_interrupted_load_leaves_weights_as_they_were(monkeypatch):
    """A KeyboardInterrupt (or any error) after the merge step, in the hot-load step: all undone."""
    from artaug_ext.lora import merge

    torch.manual_seed(0)
    dit = TinyFluxDiT(dim=64, num_heads=1, axes_dim=(16, 24, 24))
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    sd = {"blocks.0.attn.a_to_qkv.lora_A.weight": torch.randn(2, 64), "blocks.0.attn.a_to_qkv.lora_B.weight":
          torch.randn(192, 2)}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "_hotload", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_lora(dit, sd)
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())
    assert merge.loaded_loras(dit) == []


def test_unload_through_the_dit_after_loading_through_the_pipeline(pipe):
    """The undo belongs to the handle and the touched modules, not to the object passed in."""
    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    dim = pipe.dit.blocks[0].attn.a_to_qkv.weight.shape[1]
    sd = {"blocks.0.attn.a_to_qkv.lora_A.weight": torch.randn(2, dim),
          "blocks.0.attn.a_to_qkv.lora_B.weight": torch.randn(3 * dim, 2)}
    report = load_lora(pipe, sd)
    assert not torch.equal(pipe.dit.blocks[0].attn.a_to_qkv.weight, before["blocks.0.attn.a_to_qkv.weight"])
    assert unload_lora(pipe.dit) == 1  # no handle, through the DiT
    assert all(torch.equal(v, before[k]) for k, v in pipe.dit.state_dict().items())
    with pytest.raises(ValueError, match="already unloaded"):
        unload_lora(pipe, report)
    report = load_lora(pipe, sd)
    assert unload_lora(pipe.dit, report.handle) == 1  # with the handle, through the DiT
    assert all(torch.equal(v, before[k]) for k, v in pipe.dit.state_dict().items())


def test_load_lora_refuses_a_non_finite_alpha(pipe):
    dim = pipe.dit.blocks[0].attn.a_to_qkv.weight.shape[1]
    sd = {"blocks.0.attn.a_to_qkv.lora_A.weight": torch.randn(2, dim),
          "blocks.0.attn.a_to_qkv.lora_B.weight": torch.randn(3 * dim, 2)}
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(UsageError, match="alpha"):
            load_lora(pipe, sd, alpha)


# ---------------------------------------------------------------------------- generation


def test_generate_refuses_what_diffsynth_would_change_silently(pipe):
    from artaug_ext.pipeline import generate

    cases = [(dict(height=100), "height=100 is not a positive multiple of 16.*round it to 96"),
             (dict(width=0), "width=0"), (dict(steps=0), "steps=0 must be a positive integer"),
             (dict(embedded_guidance=float("nan")), "embedded_guidance=nan is not a finite number"),
             (dict(embedded_guidance=float("inf")), "not a finite number")]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            generate(pipe, "a red circle", progress=False, **{"height": 32, "width": 32, "steps": 1, **kwargs})
    with pytest.raises(UsageError, match="empty"):
        generate(pipe, "  ", progress=False)


def test_non_finite_latents_are_an_error_naming_the_step_and_no_image(pipe, monkeypatch):
    from artaug_ext.pipeline import generate

    real = type(pipe).step

    def nan_after_step_2(self, *args, **kwargs):
        latents = real(self, *args, **kwargs)
        nan_after_step_2.calls += 1
        return latents * float("nan") if nan_after_step_2.calls == 2 else latents

    nan_after_step_2.calls = 0
    monkeypatch.setattr(type(pipe), "step", nan_after_step_2)
    with pytest.raises(NonFiniteError, match="NaN or Inf at denoising step 2 .*no LoRA merged.*No image was written"):
        generate(pipe, "a red circle", height=32, width=32, steps=3, progress=False)
    monkeypatch.undo()
    assert "step" not in pipe.__dict__ and "vae_output_to_image" not in pipe.__dict__  # the guard is gone
    image = generate(pipe, "a red circle", height=32, width=32, steps=1, progress=False)
    assert image.size == (32, 32)


def test_non_finite_vae_output_is_an_error(pipe, monkeypatch):
    from artaug_ext.pipeline import generate

    decoder = pipe.vae_decoder
    real_forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: real_forward(*a, **k) * float("inf"))
    with pytest.raises(NonFiniteError, match="VAE decoder returned NaN or Inf"):
        generate(pipe, "a red circle", height=32, width=32, steps=1, progress=False)


def test_enhance_is_guarded_too(pipe, monkeypatch):
    from artaug_ext.interact.enhance import enhance
    from artaug_ext.interact.parse import Suggestion

    real = type(pipe).step
    monkeypatch.setattr(type(pipe), "step", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    with pytest.raises(NonFiniteError, match="enhancing 'a red circle' \\(seed 3\\)"):
        enhance(pipe, "a red circle", [Suggestion((0.1, 0.1, 0.5, 0.5), "bright light", "lighting")], seed=3,
                steps=2, height=32, width=32, t5_sequence_length=16)


def test_long_prompt_warns_that_t5_cuts_it(pipe, caplog):
    from artaug_ext.pipeline import generate

    with caplog.at_level(logging.WARNING):
        generate(pipe, " ".join(["red circle"] * 2500), height=32, width=32, steps=1, progress=False)
    assert "T5 tokens; FLUX reads only the first 32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        generate(pipe, "a red circle", height=32, width=32, steps=1, progress=False)
    assert "T5 tokens" not in caplog.text


def test_combine_refuses_rank_zero_and_nothing():
    layer = {"dit:blocks.0.attn.a_to_out": artaug_ext.lora.LoRALayer(torch.randn(2, 8), torch.randn(8, 2))}
    for rank in (0, -1, 1.5):
        with pytest.raises(UsageError, match="rank"):
            combine_loras([layer], rank=rank)
    with pytest.raises(UsageError, match="no LoRAs"):
        combine_loras([])
    with pytest.raises(UsageError, match="finite"):
        combine_loras([layer], weights=[float("nan")])


def test_cli_refuses_non_finite_numbers(capsys):
    from artaug_ext.cli import main

    for args in (["generate", "--prompt", "x", "--guidance", "nan"], ["generate", "--prompt", "x", "--guidance", "inf"],
                 ["generate", "--prompt", "x", "--artaug-alpha", "nan"], ["generate", "--prompt", "x", "--lora", "a:nan"],
                 ["interact", "--prompts", "p", "--out", "o", "--margin", "nan"],
                 ["interact", "--prompts", "p", "--out", "o", "--region-scale=-inf"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "finite" in err and len(err.splitlines()) == 1, (args, err)
