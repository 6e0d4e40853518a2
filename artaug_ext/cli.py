"""The `artaug` command. Nothing in the library imports this module."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .interact.cli import positive_int

logger = logging.getLogger("artaug_ext.cli")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _multiple_of_16(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0 or value % 16:
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of 16 (FLUX works on 16-pixel patches)")
    return value


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line naming the option and the fix, not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import known_models

    parser = _Parser(prog="artaug", description="ArtAug for FLUX.1 on DiffSynth-Studio")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate an image with FLUX (optionally with the ArtAug LoRA)")
    gen.add_argument("--prompt", required=True, help="text prompt")
    gen.add_argument("--model", default="tiny", choices=known_models(),
                     help="tiny: embedded model trained on procedural scenes; tiny-random: untrained (draws noise); "
                     "flux-dev: FLUX.1-dev from ModelScope")
    gen.add_argument("--model-dir", default=None, help="model root holding {model_id}/ folders (default: ARTAUG_HOME, "
                     "DIFFSYNTH_MODEL_BASE_PATH or ~/.cache/artaug)")
    gen.add_argument("--artaug", action=argparse.BooleanOptionalAction, default=None,
                     help="merge the ArtAug LoRA (default: on for flux-dev, off for the tiny models)")
    gen.add_argument("--lora-alpha", type=float, default=1.0, help="ArtAug LoRA strength (default 1.0)")
    gen.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: 8 tiny, 30 flux-dev)")
    gen.add_argument("--height", type=_multiple_of_16, default=None, help="multiple of 16 (default: 256 tiny, 1024 flux-dev)")
    gen.add_argument("--width", type=_multiple_of_16, default=None, help="multiple of 16 (default: 256 tiny, 1024 flux-dev)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--guidance", type=float, default=3.5, help="FLUX embedded guidance (default 3.5)")
    gen.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                     help="fused Triton attention kernels in the DiT (default: on for CUDA, off on CPU)")
    gen.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    gen.add_argument("--out", default="artaug.png", help="output image file (default artaug.png)")

    dl = sub.add_parser("download", help="prefetch a model into the model root (needs network)")
    dl.add_argument("model_id", help="a model id (e.g. DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1) or a catalogue "
                    "name (flux-dev, artaug, artaug-kontext, image-metrics)")
    dl.add_argument("--files", nargs="+", default=None, help="file patterns to fetch (default: the catalogue's files, else all)")
    dl.add_argument("--model-dir", default=None, help="model root to download into")
    dl.add_argument("--revision", default=None)

    from .eval_tiny import add_eval_tiny_parser
    from .interact.cli import add_interact_parser

    add_interact_parser(sub)
    add_eval_tiny_parser(sub)
    return parser


def cmd_generate(args) -> int:
    from .pipeline import REAL_MODELS, generate, load_pipeline

    if not args.prompt.strip():
        raise CLIError("--prompt is empty: give the text to draw")
    use_artaug = args.artaug if args.artaug is not None else args.model in REAL_MODELS
    if not use_artaug and args.lora_alpha != 1.0:
        logger.warning("--lora-alpha %.3g has no effect without --artaug", args.lora_alpha)
    if use_artaug and args.model not in REAL_MODELS:
        raise CLIError(f"--artaug needs a FLUX.1-dev model; {args.model!r} has no ArtAug LoRA (use --model flux-dev)")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise CLIError(f"--out {args.out}: folder {out_dir} does not exist")
    out_ext = os.path.splitext(args.out)[1]
    if out_ext:
        from PIL import Image

        if out_ext.lower() not in Image.registered_extensions():
            raise CLIError(f"--out {args.out}: unknown image format {out_ext!r} (use .png, .jpg or .webp)")
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, model_dir=args.model_dir, device=args.device)
    if use_artaug:
        _load_artaug(pipe, args)
    on_cuda = str(pipe.device).startswith("cuda")
    if args.kernels if args.kernels is not None else on_cuda:
        _apply_kernels(pipe, requested=bool(args.kernels))
    t1 = time.perf_counter()
    image = generate(pipe, args.prompt, seed=args.seed, steps=args.steps, height=args.height, width=args.width,
                     embedded_guidance=args.guidance)
    root, ext = os.path.splitext(args.out)
    tmp = f"{root}.tmp{ext or '.png'}"  # the extension picks the format: keep it
    try:
        image.save(tmp)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    t2 = time.perf_counter()
    logger.info("load %.1fs, generate %.1fs", t1 - t0, t2 - t1)
    if args.kernels or on_cuda:
        from .patch import kernel_stats

        logger.info("attention kernel calls: %s", kernel_stats())
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]}, model {args.model}, seed {args.seed}, {t2 - t0:.1f}s)")
    return 0


def _apply_kernels(pipe, requested: bool) -> None:
    """Patch the fused attention into the pipeline's DiT. Asked for with --kernels, a
    DiffSynth the patch was not written for is an error; on by default (CUDA), it only
    costs the speed-up, with a warning."""
    from artaug_kernels import interpreter_mode

    from .patch import KernelPatchError, apply_kernels

    if not str(pipe.device).startswith("cuda") and not interpreter_mode():
        logger.warning("--kernels on %s: the Triton kernels need CUDA (or TRITON_INTERPRET=1); "
                       "DiffSynth's own attention runs instead", pipe.device)
    try:
        apply_kernels(pipe)
    except KernelPatchError as e:
        if requested:
            raise CLIError(str(e)) from None
        logger.warning("%s DiffSynth's own attention runs instead.", e)


def _load_artaug(pipe, args) -> None:
    from .lora import load_artaug

    report = load_artaug(pipe, alpha=args.lora_alpha, model_dir=args.model_dir)
    logger.info("ArtAug LoRA: %d layers merged in %.2fs", len(report.merged), report.seconds)


def cmd_download(args) -> int:
    from .hub import download

    found = download(args.model_id, args.files, model_dir=args.model_dir, revision=args.revision)
    for pattern, paths in found.items():
        for p in paths:
            print(f"{pattern}: {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from .hub import HubError

    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "download":
            return cmd_download(args)
        if args.command in ("interact", "interact-export"):
            return args.func(args)
        if args.command == "eval-tiny":
            from .eval_tiny import cmd_eval_tiny

            return cmd_eval_tiny(args)
    except (CLIError, HubError, ValueError, KeyError, FileNotFoundError, FloatingPointError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"artaug: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("artaug: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
