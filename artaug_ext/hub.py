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
import threading
from urllib.parse import urlparse

from .cards import ModelCard, card, hub_lookup, known_names
from .errors import ArtaugError, FileFormatError
from .files import check_safetensors as validate_safetensors

logger = logging.getLogger(__name__)


class HubError(ArtaugError, RuntimeError):
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


def model_root(model_dir: str | None = None) -> str:
    """The one model root: explicit, else ARTAUG_HOME, DIFFSYNTH_MODEL_BASE_PATH, ~/.cache/artaug."""
    root = (
        model_dir
        or os.environ.get("ARTAUG_HOME")
        or os.environ.get("DIFFSYNTH_MODEL_BASE_PATH")
        or os.path.join(os.path.expanduser("~"), ".cache", "artaug")
    )
    return os.path.abspath(os.path.expanduser(root))


def hash_cache_file(model_dir: str | None = None) -> str:
    """Where file hashes are remembered (`files.cached_sha256_file`): one file in the model root."""
    return os.path.join(model_root(model_dir), ".artaug-sha256-cache.json")


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
    """Raise CorruptModelFileError unless `path` is a complete safetensors file (header and
    every tensor's byte range checked against the file size; no hashing)."""
    fix = f"delete it and run `artaug download {model_id}`" if model_id else "delete it and download it again"
    try:
        validate_safetensors(path, fix)
    except FileFormatError as e:
        raise CorruptModelFileError(path, e.problem, model_id) from None


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


def find_files(model_id: str, patterns: list[str], model_dir: str | None = None) -> dict[str, list[str]] | None:
    """The files of `model_id` already on this machine (no network): under the model root (or
    ModelScope's cache), or, for an explicit `model_dir`, directly in it. None if any is missing."""
    root = model_root(model_dir)
    found = find_local(model_id, patterns, root)
    if found is None and model_dir is not None:
        direct = {p: _match(root, p) for p in patterns}
        found = direct if all(direct.values()) else None
    return found


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
    found = find_files(model_id, patterns, model_dir)
    if found is None:
        missing = [p for p in patterns if not _match(os.path.join(root, model_id), p)]
        if local_files_only or _offline():
            raise MissingModelError(model_id, missing, root, "local files only" if local_files_only else "downloads are switched off")
        host = _endpoint_host(download_source())
        if not reachable(host):
            raise MissingModelError(model_id, missing, root, f"cannot reach {host}: offline or blocked")
        entry = hub_lookup(model_id)
        try:
            _download(model_id, patterns, root, revision, entry.huggingface_id if entry else None)
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


def resolve_model_files(name: str | ModelCard, model_dir: str | None = None, *, revision: str | None = None,
                        local_files_only: bool = False) -> dict[str, list[str]]:
    """{role: local paths} for a model card (`flux-dev`, `artaug`, `artaug-kontext`, ...)."""
    entry = name if isinstance(name, ModelCard) else card(name)
    if not entry.modelscope_id:
        raise HubError(f"model {entry.name!r} is embedded in artaug-ext and has nothing to download")
    patterns = list(entry.files.values()) or ["./"]
    found = resolve(entry.modelscope_id, patterns, revision=revision, model_dir=model_dir,
                    local_files_only=local_files_only)
    if not entry.files:
        return {"": found["./"]}
    return {role: found[pattern] for role, pattern in entry.files.items()}


def download(name_or_id: str, files: list[str] | None = None, *, model_dir: str | None = None,
             revision: str | None = None) -> dict[str, list[str]]:
    """Prefetch a model by card name or any hub model id `owner/name` (optionally only some file patterns)."""
    entry = hub_lookup(name_or_id)
    if entry is None and "/" not in name_or_id:
        downloadable = [n for n in known_names() if hub_lookup(n).modelscope_id]
        raise HubError(f"unknown model {name_or_id!r}: give a hub id (owner/name) or one of {', '.join(downloadable)}")
    if entry is not None and not entry.modelscope_id:
        raise HubError(f"model {entry.name!r} is embedded in artaug-ext and has nothing to download")
    model_id = entry.modelscope_id if entry else name_or_id
    patterns = files or (list(entry.files.values()) if entry and entry.files else ["./"])
    return resolve(model_id, patterns, model_dir=model_dir, revision=revision)
