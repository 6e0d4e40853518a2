"""Shared test helpers: the tiny model's files and FLUX.1-dev-named copies of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from safetensors.torch import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_folder(name: str = "tiny-random") -> str:
    from artaug_ext.hub import model_root
    from artaug_ext.tiny.build import ensure_tiny_model
    from artaug_ext.tiny.spec import get_spec

    return ensure_tiny_model(get_spec(name), model_root())


def make_fake_flux_dev(root: str, name: str = "tiny-random") -> str:
    """Lay the tiny model's files out under FLUX.1-dev's real names (T5 in two shards, as released)."""
    src = tiny_folder(name)
    dst = os.path.join(root, "black-forest-labs", "FLUX.1-dev")
    os.makedirs(os.path.join(dst, "text_encoder_2"), exist_ok=True)
    for rel in ("flux1-dev.safetensors", "ae.safetensors", "text_encoder/model.safetensors"):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy(os.path.join(src, rel), os.path.join(dst, rel))
    for rel in ("tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(src, rel), os.path.join(dst, rel), dirs_exist_ok=True)
    t5 = load_file(os.path.join(src, "text_encoder_2", "model.safetensors"))
    keys = sorted(t5)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:])):
        save_file({k: t5[k] for k in part}, os.path.join(dst, "text_encoder_2", f"model-0000{i + 1}-of-00002.safetensors"))
    return dst


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "artaug_ext.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
