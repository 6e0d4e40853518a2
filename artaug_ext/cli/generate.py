"""`artaug generate`: one image from a named model, optionally with the ArtAug LoRA and others."""

from __future__ import annotations

import argparse
import logging
import os
import time

from ..errors import UsageError
from .args import (
    DEFAULT_MAX_PIXELS,
    add_quantize_options,
    check_device,
    check_image_size,
    check_lora_file,
    check_model_dir,
    check_output_file,
    check_quantize_options,
    finite_float,
    lora_spec,
    multiple_of_16,
    positive_int,
)

logger = logging.getLogger("artaug_ext.cli")


def add_parser(sub) -> None:
    from ..cards import base_models

    gen = sub.add_parser("generate", help="generate an image with FLUX (optionally with the ArtAug LoRA)")
    gen.add_argument("--prompt", required=True, help="text prompt")
    gen.add_argument("--model", default="tiny", choices=base_models(),
                     help="tiny: embedded model trained on procedural scenes; tiny-random: untrained (draws noise); "
                     "flux-dev: FLUX.1-dev from ModelScope")
    gen.add_argument("--model-dir", default=None, help="model root holding {model_id}/ folders (default: ARTAUG_HOME, "
                     "DIFFSYNTH_MODEL_BASE_PATH or ~/.cache/artaug)")
    gen.add_argument("--artaug", action=argparse.BooleanOptionalAction, default=None,
                     help="merge the ArtAug LoRA (default: on for flux-dev, off for the tiny models)")
    gen.add_argument("--artaug-alpha", "--lora-alpha", dest="artaug_alpha", type=finite_float, default=1.0,
                     help="strength of the ArtAug LoRA (default 1.0; --lora-alpha is the old name)")
    gen.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="PATH[:ALPHA]",
                     help="merge a LoRA file first, any format artaug reads (repeatable), e.g. an `artaug run` result")
    gen.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: 8 tiny, 30 flux-dev)")
    gen.add_argument("--height", type=multiple_of_16, default=None, help="multiple of 16 (default: 256 tiny, 1024 flux-dev)")
    gen.add_argument("--width", type=multiple_of_16, default=None, help="multiple of 16 (default: 256 tiny, 1024 flux-dev)")
    gen.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                     help=f"refuse larger images (default {DEFAULT_MAX_PIXELS}, 2048x2048)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--guidance", type=finite_float, default=3.5, help="FLUX embedded guidance (default 3.5)")
    gen.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                     help="fused Triton attention kernels in the DiT (default: on for CUDA, off on CPU)")
    gen.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    add_quantize_options(gen)
    gen.add_argument("--out", default="artaug.png", help="output image file (default artaug.png)")
    gen.set_defaults(run=run)


def check(args) -> tuple[bool, int, int]:
    """Every check that needs no model, cheapest first; returns (use_artaug, width, height)."""
    from ..cards import card

    if not args.prompt.strip():
        raise UsageError("--prompt is empty: give the text to draw")
    c = card(args.model)
    use_artaug = args.artaug if args.artaug is not None else c.companion_lora is not None
    if not use_artaug and args.artaug_alpha != 1.0:
        logger.warning("--artaug-alpha %.3g has no effect without --artaug", args.artaug_alpha)
    if use_artaug and c.companion_lora is None:
        raise UsageError(f"--artaug needs a FLUX.1-dev model; {args.model!r} has no ArtAug LoRA (use --model flux-dev)")
    check_output_file("--out", args.out)
    out_ext = os.path.splitext(args.out)[1]
    if out_ext:
        from PIL import Image

        if out_ext.lower() not in Image.registered_extensions():
            raise UsageError(f"--out {args.out}: unknown image format {out_ext!r} (use .png, .jpg or .webp)")
    width, height = args.width or c.defaults.size, args.height or c.defaults.size
    check_image_size(width, height, args.max_pixels)
    for path, _ in args.lora:
        check_lora_file("--lora", path)
    check_device("--device", args.device)
    check_quantize_options(args)
    check_model_dir(args.model, args.model_dir)
    if not c.is_tiny:
        # Find (or download) the files before torch and DiffSynth are imported: a missing model
        # is then reported in about a second.
        from ..hub import resolve_model_files

        resolve_model_files(c, args.model_dir)
        if use_artaug:
            resolve_model_files(card(c.companion_lora), args.model_dir)
    return use_artaug, width, height


def run(args) -> int:
    use_artaug, width, height = check(args)
    from ..lora import load_artaug, load_lora
    from ..pipeline import generate, load_pipeline, save_image

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, model_dir=args.model_dir, device=args.device, quantize=args.quantize,
                         text_encoders=args.text_encoders)
    if use_artaug:
        report = load_artaug(pipe, alpha=args.artaug_alpha, model_dir=args.model_dir)
        logger.info("ArtAug LoRA: %s", report)
    for path, alpha in args.lora:
        report = load_lora(pipe, path, alpha=alpha)
        logger.info("%s: %s", path, report)
    on_cuda = str(pipe.device).startswith("cuda")
    if args.kernels if args.kernels is not None else on_cuda:
        apply_kernels(pipe, requested=bool(args.kernels))
    t1 = time.perf_counter()
    image = generate(pipe, args.prompt, seed=args.seed, steps=args.steps, height=height, width=width,
                     embedded_guidance=args.guidance)
    save_image(image, args.out)
    t2 = time.perf_counter()
    logger.info("load %.1fs, generate %.1fs", t1 - t0, t2 - t1)
    if args.kernels or on_cuda:
        from ..patch import kernel_stats

        logger.info("attention kernel calls: %s", kernel_stats())
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]}, model {args.model}, seed {args.seed}, {t2 - t0:.1f}s)")
    return 0


def apply_kernels(pipe, requested: bool) -> None:
    """Patch the fused attention into the pipeline's DiT. Asked for with --kernels, a
    DiffSynth the patch was not written for is an error; on by default (CUDA), it only
    costs the speed-up, with a warning."""
    from artaug_kernels import interpreter_mode

    from ..patch import KernelPatchError
    from ..patch import apply_kernels as patch_kernels

    if not str(pipe.device).startswith("cuda") and not interpreter_mode():
        logger.warning("--kernels on %s: the Triton kernels need CUDA (or TRITON_INTERPRET=1); "
                       "DiffSynth's own attention runs instead", pipe.device)
    try:
        patch_kernels(pipe)
    except KernelPatchError as e:
        if requested:
            raise UsageError(str(e)) from None
        logger.warning("%s DiffSynth's own attention runs instead.", e)
