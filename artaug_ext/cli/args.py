"""Argument types and early checks shared by every `artaug` subcommand.

Everything here runs before a model is loaded, and most of it without importing torch, so
a bad option costs a fraction of a second and prints one line naming the option and the fix.
"""

from __future__ import annotations

import argparse
import math
import os

from ..errors import UsageError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def multiple_of_16(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0 or value % 16:
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of 16 (FLUX works on 16-pixel patches)")
    return value


def image_size(text: str) -> tuple[int, int]:
    """"256" or "512x384" (width x height), multiples of 16."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use N or WIDTHxHEIGHT") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or any(v <= 0 or v % 16 for v in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive multiples of 16 (FLUX works on 16-pixel patches)")
    return parts[0], parts[1]


def lora_spec(text: str) -> tuple[str, float]:
    """PATH or PATH:ALPHA (a path that exists as given is never split at a colon)."""
    if os.path.exists(text) or ":" not in text:
        return text, 1.0
    path, _, alpha = text.rpartition(":")
    try:
        value = float(alpha)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use PATH or PATH:ALPHA") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: ALPHA must be a finite number")
    return path, value


def add_quantize_options(p) -> None:
    """--quantize and --text-encoders: a quantised DiT through DiffSynth (load_pipeline's options)."""
    from ..quant import TEXT_ENCODERS

    p.add_argument("--quantize", default=None, metavar="METHOD",
                   help="quantise the DiT with a DiffSynth method, e.g. torchao_int8_w8a16 (pip install -e "
                   "\".[quant]\"); LoRAs are then hot-loaded, not merged")
    p.add_argument("--text-encoders", default="resident", choices=TEXT_ENCODERS,
                   help="resident (default), quantized (with --quantize's method) or offloaded (on the host, a "
                   "layer at a time on the device)")


def check_quantize_options(args) -> None:
    """The quantisation options, checked before anything loads (one line naming the option)."""
    from ..quant import check_quantize, check_text_encoders

    check_text_encoders(args.text_encoders, args.quantize, "--text-encoders", "--quantize METHOD")
    if args.quantize:
        check_quantize(args.quantize, training=False, what="--quantize")


def add_launch_options(p) -> None:
    """Options of a command that runs under torchrun / accelerate launch (run, demo, interact, eval)."""
    from ..dist import DEFAULT_COLLECTIVE_TIMEOUT

    p.add_argument("--collective-timeout", type=positive_int, default=DEFAULT_COLLECTIVE_TIMEOUT, metavar="SECONDS",
                   help="multi-process launches: how long a rank waits for the others in a collective before the "
                   f"launch stops, naming the rank (default {DEFAULT_COLLECTIVE_TIMEOUT}, torch's)")


class Parser(argparse.ArgumentParser):
    """Argument errors as one line naming the option and the fix, not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------------------- early checks

def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_file(option: str, path: str) -> None:
    """An image (or other file) we are about to write: not a folder, in a writable folder."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file name such as {os.path.join(path, 'out.png')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: folder {folder} is not writable; choose another place")


def check_output_dir(option: str, path: str) -> None:
    """A folder we are about to create or fill: not a regular file, writable (or creatable)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path} is a file; give a folder (it is created if missing)")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise UsageError(f"{option} {path}: {base} is a file, so the folder cannot be created")
    if not os.access(base, os.W_OK):
        raise UsageError(f"{option} {path}: {base} is not writable; choose another place")


def check_input_file(option: str, path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{option} {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file")


def check_lora_file(option: str, path: str) -> None:
    """A LoRA file exists and, unless it is a torch pickle, is a complete safetensors file
    (its header is read; nothing is loaded)."""
    from ..files import LORA_FILE_FIX, TORCH_PICKLE_SUFFIXES, check_safetensors

    if not os.path.exists(path):
        raise UsageError(f"{option} {path}: no such file")
    if os.path.isfile(path) and not path.endswith(TORCH_PICKLE_SUFFIXES):
        check_safetensors(path, LORA_FILE_FIX)


def check_device(option: str, device: str | None) -> None:
    """cpu, cuda, cuda:N (or mps); a CUDA device must exist (this check imports torch)."""
    if device is None:
        return
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise UsageError(f"{option} {device!r}: not a device; use cpu, cuda or cuda:N")
    if kind == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{option} {device}: no CUDA GPU is visible on this machine; use {option} cpu")
        if index and int(index) >= count:
            raise UsageError(f"{option} {device}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    if kind == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise UsageError(f"{option} mps: Apple's MPS backend is not available here; use {option} cpu")


def check_model_dir(model: str, model_dir: str | None, *, option: str = "--model-dir") -> None:
    """A model root that is a file is an error; one we must write into (the first build of a
    tiny model, a download) must be writable. A read-only root that already holds the model is fine."""
    from ..cards import card
    from ..hub import find_files, model_root

    if model_dir is not None and os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise UsageError(f"{option} {model_dir} is a file; give the folder that holds the models")
    root = model_root(model_dir)
    c = card(model)
    if c.is_tiny:
        from ..tiny.build import MARKER, model_folder
        from ..tiny.spec import get_spec

        needs_write = not os.path.isfile(os.path.join(model_folder(get_spec(model), root), MARKER))
        what = f"the first build of the embedded {model} model"
    elif c.modelscope_id:
        needs_write = find_files(c.modelscope_id, list(c.files.values()) or ["./"], model_dir) is None
        what = f"downloading {c.modelscope_id}"
    else:
        return
    if needs_write and os.path.exists(root) and not os.access(root, os.W_OK):
        raise UsageError(f"{option if model_dir else 'model root'} {root} is not writable, and {what} must write there; "
                         "choose a writable --model-dir (or ARTAUG_HOME)")
    if needs_write and not os.path.exists(root):
        base = _nearest_existing(root)
        if not os.path.isdir(base) or not os.access(base, os.W_OK):
            raise UsageError(f"model root {root} cannot be created ({base} is not a writable folder), and {what} "
                             "must write there; choose a writable --model-dir (or ARTAUG_HOME)")


# Above this many pixels an image is refused unless --max-pixels raises the limit: FLUX.1 is
# trained up to about 2 MP, and at 4 MP its VAE decoder alone needs several GiB.
DEFAULT_MAX_PIXELS = 2048 * 2048


def vae_memory_gib(width: int, height: int, bytes_per_value: int = 4) -> float:
    """A lower bound of one image's peak memory: the FLUX VAE decoder's last stage holds about
    three 128-channel maps at full resolution (attention and the DiT come on top)."""
    return 3 * 128 * width * height * bytes_per_value / 2**30


def check_image_size(width: int, height: int, max_pixels: int, option: str = "--height/--width") -> None:
    if width * height > max_pixels:
        raise UsageError(f"{option} {width}x{height} is {width * height / 1e6:.1f} MP, above the limit of "
                         f"{max_pixels / 1e6:.1f} MP; it would need at least {vae_memory_gib(width, height):,.0f} GiB "
                         "at fp32 (the VAE decoder alone). Fix: a smaller size, or --max-pixels N to raise the limit")
