"""Model ids to local files: one model root, laid out as DiffSynth lays it out.

Files live in `{root}/{model_id}/...`, the layout DiffSynth's `ModelConfig` downloads
into, so a user's existing DiffSynth downloads are found and nothing is stored twice.
The root is `ARTAUG_HOME`, else `DIFFSYNTH_MODEL_BASE_PATH`, else `~/.cache/artaug`.

Resolution order for a model id and its file patterns:
1. an explicit local folder (`model_dir`, the CLI's `--model-dir`), used as the root;
2. files already in the model root, or in the ModelScope cache (no network);
3. a download (ModelScope `snapshot_download`, or Hugging Face when
   `DIFFSYNTH_DOWNLOAD_SOURCE=huggingface`, with that hub's id), with a progress bar.

DiffSynth only ever receives `ModelConfig(path=...)` from us, tokenizers included:
its default configs would contact ModelScope even when the files are present.
Offline, resolution fails within seconds with an error naming the model id, the
missing files and the two fixes. Safetensors files are checked (header and size)
before use, so a truncated download is reported instead of loaded half-way.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from urllib.parse import urlparse

logger = logging.getLogger(__name__)


class HubError(RuntimeError):
    """Base class of the hub layer's errors."""


class MissingModelError(HubError):
    """A model's files are not on this machine and could not be downloaded."""

    def __init__(self, model_id: str, missing: list[str], root: str, reason: str):
        self.model_id, self.missing, self.root, self.reason = model_id, missing, root, reason
        super().__init__(
            f"model {model_id!r}: missing {', '.join(missing)} under {os.path.join(root, model_id)} ({reason}). "
            f"Fix: run `artaug download {model_id}` on a machine with network access and copy the model root, "
            f"or pass --model-dir pointing at a folder that holds {model_id}/ (or set ARTAUG_HOME)."
        )


class CorruptModelFileError(HubError):
    """A safetensors file is truncated or its header is unreadable."""

    def __init__(self, path: str, problem: str, model_id: str | None = None):
        self.path, self.problem = path, problem
        fix = f"delete it and run `artaug download {model_id}`" if model_id else "delete it and download it again"
        super().__init__(f"corrupt model file {path}: {problem}. Fix: {fix}.")


@dataclass(frozen=True)
class CatalogueEntry:
    """A model we know by name: its ids on both hubs and the files each role needs."""

    modelscope_id: str
    huggingface_id: str
    files: dict[str, str] = field(default_factory=dict)  # role -> file pattern ("dir/" = folder)
    description: str = ""


CATALOGUE: dict[str, CatalogueEntry] = {
    "flux-dev": CatalogueEntry(
        modelscope_id="black-forest-labs/FLUX.1-dev",
        huggingface_id="black-forest-labs/FLUX.1-dev",
        files={
            "dit": "flux1-dev.safetensors",
            "vae": "ae.safetensors",
            "text_encoder": "text_encoder/model.safetensors",
            "text_encoder_2": "text_encoder_2/*.safetensors",
            "tokenizer": "tokenizer/",
            "tokenizer_2": "tokenizer_2/",
        },
        description="FLUX.1-dev base model (DiT, VAE, CLIP and T5 encoders, tokenizers)",
    ),
    "artaug": CatalogueEntry(
        modelscope_id="DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1",
        huggingface_id="ECNU-CILab/ArtAug-lora-FLUX.1dev-v1",
        files={"lora": "merged_lora.safetensors"},
        description="The released ArtAug LoRA for FLUX.1-dev (universal FLUX LoRA keys, alpha 1.0)",
    ),
    "artaug-kontext": CatalogueEntry(
        modelscope_id="DiffSynth-Studio/FLUX.1-Kontext-dev-lora-ArtAug",
        huggingface_id="DiffSynth-Studio/FLUX.1-Kontext-dev-lora-ArtAug",
        files={"lora": "*.safetensors"},
        description="ArtAug LoRA for FLUX.1-Kontext-dev",
    ),
    "image-metrics": CatalogueEntry(
        modelscope_id="DiffSynth-Studio/ImageMetrics",
        huggingface_id="DiffSynth-Studio/ImageMetrics",
        files={},
        description="DiffSynth's image-quality metric weights (aesthetic, PickScore, CLIP, HPS, ImageReward)",
    ),
}


def catalogue_lookup(name_or_id: str) -> tuple[str, CatalogueEntry] | None:
    """Find a catalogue entry by its short name or by either hub's model id."""
    if name_or_id in CATALOGUE:
        return name_or_id, CATALOGUE[name_or_id]
    for key, entry in CATALOGUE.items():
        if name_or_id in (entry.modelscope_id, entry.huggingface_id):
            return key, entry
    return None


def model_root(model_dir: str | None = None) -> str:
    """The one model root: explicit, else ARTAUG_HOME, DIFFSYNTH_MODEL_BASE_PATH, ~/.cache/artaug."""
    root = (
        model_dir
        or os.environ.get("ARTAUG_HOME")
        or os.environ.get("DIFFSYNTH_MODEL_BASE_PATH")
        or os.path.join(os.path.expanduser("~"), ".cache", "artaug")
    )
    return os.path.abspath(os.path.expanduser(root))


def download_source() -> str:
    return os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE", "modelscope").strip().lower()


def _offline() -> bool:
    truthy = ("1", "true", "yes", "on")
    return (
        os.environ.get("ARTAUG_OFFLINE", "").lower() in truthy
        or os.environ.get("DIFFSYNTH_SKIP_DOWNLOAD", "").lower() in truthy
        or (download_source() == "huggingface" and os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy)
    )


def modelscope_cache_dirs(model_id: str) -> list[str]:
    cache = os.environ.get("MODELSCOPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "modelscope", "hub")
    return [os.path.join(cache, "models", model_id), os.path.join(cache, model_id)]


# ---------------------------------------------------------------------------- integrity

def check_safetensors(path: str, model_id: str | None = None) -> None:
    """Raise CorruptModelFileError unless `path` has a readable header and the size it declares."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptModelFileError(path, f"file is {size} bytes, too short for a safetensors header", model_id)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 1024 * 1024:
                raise CorruptModelFileError(path, f"header length {n} exceeds the file ({size} bytes)", model_id)
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModelFileError(path, f"unreadable header ({e})", model_id) from None
    if not isinstance(header, dict):
        raise CorruptModelFileError(path, "header is not a JSON object", model_id)
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise CorruptModelFileError(path, f"tensor {key!r} has no valid data_offsets", model_id) from None
    if 8 + n + end != size:
        raise CorruptModelFileError(
            path, f"size {size} bytes but the header describes {8 + n + end} (truncated download?)", model_id
        )


def _check_files(paths: list[str], model_id: str) -> None:
    for p in paths:
        if p.endswith(".safetensors") and os.path.isfile(p):
            check_safetensors(p, model_id)


def missing_shards(paths: list[str]) -> list[str]:
    """Shards listed by a `*.safetensors.index.json` beside `paths` but absent (an interrupted download)."""
    missing = []
    for folder in sorted({os.path.dirname(p) for p in paths if p.endswith(".safetensors")}):
        for index in glob.glob(os.path.join(folder, "*.safetensors.index.json")):
            try:
                with open(index, encoding="utf-8") as f:
                    shards = set(json.load(f).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
                continue
            missing += [os.path.join(folder, s) for s in sorted(shards) if not os.path.isfile(os.path.join(folder, s))]
    return missing


# ---------------------------------------------------------------------------- local lookup

def _match(base: str, pattern: str) -> list[str]:
    """Local paths matching one pattern under `base` ("dir/" patterns match a non-empty folder)."""
    if pattern in ("", "./", "*"):
        return [base] if os.path.isdir(base) and os.listdir(base) else []
    if pattern.endswith("/"):
        d = os.path.join(base, pattern.rstrip("/"))
        return [d] if os.path.isdir(d) and os.listdir(d) else []
    return sorted(p for p in glob.glob(os.path.join(base, pattern)) if os.path.isfile(p))


def find_local(model_id: str, patterns: list[str], root: str) -> dict[str, list[str]] | None:
    """All patterns matched in one folder (model root first, then ModelScope's cache), else None."""
    for base in [os.path.join(root, model_id)] + modelscope_cache_dirs(model_id):
        found = {p: _match(base, p) for p in patterns}
        if all(found.values()):
            return found
    return None


# ---------------------------------------------------------------------------- download

def _endpoint_host(source: str) -> str:
    if source == "huggingface":
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    endpoint = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "https://www.modelscope.cn"
    if "://" not in endpoint:
        endpoint = "https://" + endpoint
    return urlparse(endpoint).hostname or "www.modelscope.cn"


def reachable(host: str, port: int = 443, timeout: float = 4.0) -> bool:
    """Can we open a TCP connection to the hub within `timeout` (DNS included)?

    Runs in a thread because name resolution has no timeout of its own; this is what
    makes an offline machine fail in seconds instead of after the hub client's retries.
    """
    result = {"ok": False}

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return result["ok"]


def _download(model_id: str, patterns: list[str], root: str, revision: str | None, hf_id: str | None) -> None:
    local_dir = os.path.join(root, model_id)
    allow = [p + "*" if p.endswith("/") else p for p in patterns] or None
    source = download_source()
    if source == "huggingface":
        from huggingface_hub import snapshot_download as hf_snapshot_download

        logger.info("Downloading %s from Hugging Face (%s) into %s", hf_id or model_id, ", ".join(patterns), local_dir)
        hf_snapshot_download(hf_id or model_id, local_dir=local_dir, allow_patterns=allow, revision=revision)
    elif source == "modelscope":
        from modelscope import snapshot_download

        logger.info("Downloading %s from ModelScope (%s) into %s", model_id, ", ".join(patterns), local_dir)
        snapshot_download(model_id, local_dir=local_dir, allow_file_pattern=allow, revision=revision)
    else:
        raise HubError(f"DIFFSYNTH_DOWNLOAD_SOURCE={source!r}: use 'modelscope' or 'huggingface'")


def resolve(
    model_id: str,
    patterns: list[str],
    *,
    revision: str | None = None,
    model_dir: str | None = None,
    local_files_only: bool = False,
) -> dict[str, list[str]]:
    """{pattern: local paths} for `model_id`, downloading what is missing (see module docs).

    `model_dir` is the model root to use (files under `{model_dir}/{model_id}/`, or directly
    in `model_dir`); downloads go there too.
    """
    root = model_root(model_dir)
    found = find_local(model_id, patterns, root)
    if found is None and model_dir is not None:
        direct = {p: _match(root, p) for p in patterns}
        found = direct if all(direct.values()) else None
    if found is None:
        missing = [p for p in patterns if not _match(os.path.join(root, model_id), p)]
        if local_files_only or _offline():
            raise MissingModelError(model_id, missing, root, "local files only" if local_files_only else "downloads are switched off")
        host = _endpoint_host(download_source())
        if not reachable(host):
            raise MissingModelError(model_id, missing, root, f"cannot reach {host}: offline or blocked")
        entry = catalogue_lookup(model_id)
        try:
            _download(model_id, patterns, root, revision, entry[1].huggingface_id if entry else None)
        except HubError:
            raise
        except Exception as e:  # hub clients raise many types; keep the message and the fix together
            raise MissingModelError(model_id, missing, root, f"download failed: {type(e).__name__}: {e}") from e
        found = find_local(model_id, patterns, root)
        if found is None:
            still = [p for p in patterns if not _match(os.path.join(root, model_id), p)]
            raise MissingModelError(model_id, still, root, "the download finished without these files")
    for paths in found.values():
        _check_files(paths, model_id)
        absent = missing_shards(paths)
        if absent:
            raise MissingModelError(model_id, [os.path.relpath(a, root) for a in absent], root,
                                    "a sharded file is incomplete")
    return found


def resolve_model_files(key: str, model_dir: str | None = None, *, revision: str | None = None,
                        local_files_only: bool = False) -> dict[str, list[str]]:
    """{role: local paths} for a catalogue entry (`flux-dev`, `artaug`, `artaug-kontext`, ...)."""
    found_entry = catalogue_lookup(key)
    if found_entry is None:
        raise KeyError(f"unknown model {key!r}; known: {', '.join(sorted(CATALOGUE))}")
    entry = found_entry[1]
    patterns = list(entry.files.values()) or ["./"]
    found = resolve(entry.modelscope_id, patterns, revision=revision, model_dir=model_dir,
                    local_files_only=local_files_only)
    if not entry.files:
        return {"": found["./"]}
    return {role: found[pattern] for role, pattern in entry.files.items()}


def download(name_or_id: str, files: list[str] | None = None, *, model_dir: str | None = None,
             revision: str | None = None) -> dict[str, list[str]]:
    """Prefetch a catalogue model or any model id (optionally only some file patterns)."""
    entry = catalogue_lookup(name_or_id)
    model_id = entry[1].modelscope_id if entry else name_or_id
    patterns = files or (list(entry[1].files.values()) if entry and entry[1].files else ["./"])
    return resolve(model_id, patterns, model_dir=model_dir, revision=revision)
