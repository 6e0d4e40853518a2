"""File helpers shared across the library (floor 1: imports nothing of ours but errors).

Long runs write every file atomically (a temporary file, fsync, rename), append JSONL
records with one write each, and lock their folder, so a run killed at any point loses
nothing and a second process on the same folder is refused instead of corrupting it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import time

from .errors import FileFormatError, OutOfSpaceError, RunLockedError, UsageError

logger = logging.getLogger(__name__)


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (model files are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_sha256_file(path: str, cache_file: str) -> str:
    """sha256 of a file, remembered in `cache_file` by (real path, size, mtime): FLUX.1-dev's
    files are 30+ GB, and every start and every rank would otherwise hash them again."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    try:
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}  # a missing or damaged cache costs one hash, nothing else
    if key in cache:
        return cache[key]
    digest = sha256_file(real)
    if st.st_size >= 64 << 20:  # only big files are worth remembering
        cache[key] = digest
        try:
            atomic_write_bytes(cache_file, json.dumps(cache, indent=0).encode(), shared=True)
        except OSError:
            pass
    return digest


def sha256_path(path: str, cache_file: str) -> str:
    """sha256 of a file (through the cache), or of a folder's files (names and contents, sorted)."""
    if os.path.isfile(path):
        return cached_sha256_file(path, cache_file)
    h = hashlib.sha256()
    for p in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
        if os.path.isfile(p):
            h.update(os.path.relpath(p, path).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def atomic_write_bytes(path: str, data: bytes, shared: bool = False) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete, never partial.

    `shared`: other processes may write the same path at the same time (a run's settings when
    ranks start together, a merged manifest, a hash cache), so the temporary file is per
    process; otherwise two writers share one temporary file and the second rename fails."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp" if shared else path + ".tmp"
    with writing(path, tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


# errno values of a write that failed for lack of room: disk full, file-size limit, quota.
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
# What torch's checkpoint writer raises (a RuntimeError with no errno) when the write fails.
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "file write failed", "unexpected pos")


def out_of_room(e: BaseException) -> bool:
    """Whether `e` is a write that failed because the disk is full or a file-size limit was hit."""
    if isinstance(e, OSError):
        return e.errno in _NO_ROOM
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE_FAILED)


@contextlib.contextmanager
def writing(path: str, *partial: str):
    """Around the write of `path`: a write that fails because the disk is full or a file-size
    limit was hit becomes one OutOfSpaceError naming `path` (not a chain of OS or torch
    tracebacks); the `partial` files it leaves (temporary files, never `path` itself: writes
    go to a temporary file and are renamed) are removed."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not out_of_room(e):
            raise
        for p in partial:
            with contextlib.suppress(OSError):
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.remove(p)
        why = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed"
        raise OutOfSpaceError(f"{path}: could not be written: the disk is full or a file-size limit was hit ({why}); "
                              "free space (or raise the limit, `ulimit -f`) and run the same command again: it "
                              "resumes where it stopped, nothing written before is lost") from None


_ST_DTYPE_NAME = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                  "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                  "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> str:
    """Write tensors as a safetensors file, atomically (a per-process temporary file, then a
    rename) and reproducibly: tensors and metadata in sorted order, so the same tensors give the
    same bytes (the safetensors library writes its metadata in hash order, which changes from
    process to process). Metadata values that are not strings are stored as JSON."""
    import torch

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in sorted((metadata or {}).items())}
    header: dict = {"__metadata__": meta} if meta else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = _ST_DTYPE_NAME[str(t.dtype).replace("torch.", "")]
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with writing(path, tmp):
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for data in blobs:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def json_line(record: dict) -> bytes:
    """One JSONL record, keys sorted, so equal records are equal bytes."""
    return (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: str, obj, shared: bool = False) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n",
                       shared=shared)


def without_defaults(record: dict, defaults: dict) -> dict:
    """`record` without the keys of `defaults` that hold their default value: settings added
    after a record's format are written only when set, so records made before them still match."""
    return {k: v for k, v in record.items() if not (k in defaults and v == defaults[k])}


def first_difference(old, new, prefix: str = "") -> str | None:
    """Where two JSON-like values first differ, as "key.subkey[2].name: old -> new" (None if
    equal), recursing into dicts and into lists of equal length; tuples compare as the lists
    JSON makes of them."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    if old == new:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return first_difference(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                return first_difference(a, b, f"{prefix or 'value'}[{i}]")
    return f"{prefix or 'value'}: {_shown(old)} -> {_shown(new)}"


def _shown(value) -> str:
    """A value in a one-line message, whole, or described when it is too long to read in one
    (a message is never cut in the middle of a value)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    if len(text) <= 120:
        return text
    kind = {str: "text", list: "list", dict: "table"}.get(type(value), "value")
    size = f"{len(value)} items" if isinstance(value, (list, dict)) else f"{len(text)} characters"
    return f"a {kind} of {size} (sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]})"


def read_json(path: str, what: str, fix: str, kind: type | None = dict):
    """A JSON file's value, the one reader of every JSON file we resume from; a file that does
    not decode or parse (or whose value is not a `kind`) raises naming it, what it is and the fix
    (never a bare UnicodeDecodeError or JSONDecodeError)."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FileFormatError(path, f"this {what} is not valid JSON (byte {e.start} is not UTF-8 text)", fix) from None
    except ValueError as e:
        raise FileFormatError(path, f"this {what} is not valid JSON ({type(e).__name__}: {e})", fix) from None
    if kind is not None and not isinstance(value, kind):
        raise FileFormatError(path, f"this {what} is not a JSON {'object' if kind is dict else kind.__name__}", fix)
    return value


def readable_json(path: str, what: str) -> FileFormatError | None:
    """Why the JSON file `path` cannot be trusted (None: it parses as an object): the check of
    a record a run can make again, before it trusts it."""
    try:
        read_json(path, what, "")
    except FileFormatError as e:
        return e
    return None


SETTINGS_FIX = "delete the folder it is in and run again"


def recorded_difference(path: str, record: dict, what: str = "settings record", fix: str = SETTINGS_FIX) -> str | None:
    """How `record` differs from what the JSON file `path` recorded (None if the file is absent
    or equal): how a folder tells that a resume has other settings than the run that made it."""
    if not os.path.exists(path):
        return None
    return first_difference(read_json(path, what, fix), record)


def record_settings(path: str, settings: dict, refusal: str, write: bool = True, what: str = "settings record",
                    fix: str = SETTINGS_FIX) -> None:
    """The settings record of a folder: refuse (UsageError `refusal` with "{diff}" filled in by
    the first difference) when `path` records other settings, else write it if absent. Every resumable folder
    (a run, a pair dataset, a latent cache, an eval) keeps its record this way; several ranks
    may write it at once (`shared`). A record that does not parse raises naming it, `what` it
    is and `fix`."""
    diff = recorded_difference(path, settings, what, fix)
    if diff:
        raise UsageError(refusal.format(diff=diff))
    if write and not os.path.exists(path):
        atomic_write_json(path, settings, shared=True)


def append_line(path: str, record: dict) -> None:
    """Append one JSONL record with one write and fsync it (a torn last line, from a kill
    inside the write or a full disk, is repaired by `read_jsonl(repair=True)`)."""
    with writing(path), open(path, "ab") as f:
        f.write(json_line(record))
        f.flush()
        os.fsync(f.fileno())


LINE_FIX = "delete that line (its item is made again on the next run) or restore the file"


def read_jsonl(path: str, repair: bool = False, what: str = "manifest", appended: bool = True,
               fix: str = LINE_FIX) -> list[dict]:
    """Records of a JSONL file. `appended`: the file grows by `append_line`, so a torn LAST line
    (the file ends without a newline: a killed append) is an interrupted write, ignored, or cut
    off if `repair`. Any other damaged line, and any torn line of a file written whole
    (`appended=False`, or an appended file that is finished), raises naming the file, the line
    and `fix`: records are never dropped silently."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data) and not appended:
        n = data[:end].count(b"\n") + 1
        raise FileFormatError(f"{path}:{n}", f"line {n} of this {what} is cut off (the file ends without a newline, "
                              "but it was written whole)", fix)
    if end < len(data):
        logger.warning("%s: dropping a torn last line (%d bytes) from an interrupted run", path, len(data) - end)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
    records = []
    for n, line in enumerate(data[:end].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            why = f"byte {e.start} is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
            raise FileFormatError(f"{path}:{n}", f"line {n} of this {what} is not a JSON record ({why})", fix) from None
        if not isinstance(record, dict):
            raise FileFormatError(f"{path}:{n}", f"line {n} of this {what} is not a JSON object", fix)
        records.append(record)
    return records


def read_text_lines(path: str, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a BOM is dropped); bytes that are not UTF-8 raise naming the line."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    out = []
    for n, raw in enumerate(lines, 1):
        try:
            out.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise FileFormatError(f"{path}:{n}", f"this {what} is not UTF-8 text (byte {e.start} of line {n})",
                                  "save it as UTF-8") from None
    return out


# Bytes per element of each safetensors dtype.
_ST_DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                  "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_ST_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors format itself sets


# Files read as torch pickles (with weights_only=True); a LoRA file of any other name is safetensors.
TORCH_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
LORA_FILE_FIX = "give a LoRA in .safetensors (or a PEFT folder); re-download or re-export a truncated file"


def check_safetensors(path: str, fix: str = "download or export the file again") -> dict:
    """The header of a safetensors file, after checking it against the file: a readable JSON
    header, and every tensor's dtype, shape and byte range inside the data, with no gap or
    overlap and nothing after the last tensor. Reads the header only (no hashing of GB files).
    Raises FileFormatError naming the file, what is wrong and `fix`."""
    size = os.path.getsize(path)

    def bad(problem: str):
        return FileFormatError(path, problem, fix)

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"not a safetensors file: {size} bytes, too short for a header")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _ST_MAX_HEADER:
            raise bad(f"not a safetensors file, or truncated: its header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"not a safetensors file: unreadable header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise bad("not a safetensors file: its header is not a JSON object")
    ranges = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for d in shape:
                count *= int(d)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {key!r} has no valid dtype, shape or data_offsets") from None
        if dtype not in _ST_DTYPE_SIZE:
            raise bad(f"tensor {key!r} has an unknown dtype {dtype!r}")
        if not 0 <= begin <= end or end - begin != count * _ST_DTYPE_SIZE[dtype]:
            raise bad(f"tensor {key!r}: bytes {begin}..{end} do not hold a {dtype} tensor of shape {shape}")
        ranges.append((begin, end, key))
    ranges.sort()
    cursor = 0
    for begin, end, key in ranges:
        if begin != cursor:
            raise bad(f"tensor {key!r} starts at byte {begin}, not where the previous one ends ({cursor})")
        cursor = end
    if 8 + n + cursor != size:
        what = "truncated" if 8 + n + cursor > size else "has bytes after the last tensor"
        raise bad(f"{what}: {size} bytes, but the header describes {8 + n + cursor}")
    return header


def lock_holder(folder: str, pattern: str) -> str | None:
    """The process holding a live lock on `folder` (a lock file matching `pattern`, as
    FolderLock writes them), as the pid its holder wrote; None when no lock is held."""
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), pattern))):
        lines = held_lock(path)
        if lines is not None:
            return lines[0] if lines else "another process"
    return None


def held_lock(path: str) -> list[str] | None:
    """The lines the live holder of the lock file `path` wrote (FolderLock: its pid, then its
    launch), [] while it has not written them yet; None when no live process holds it. A probe:
    a shared lock taken and dropped at once, so it never blocks the holder for more than that."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return [line.strip() for line in os.read(fd, 512).decode("ascii", "replace").splitlines() if line.strip()]
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return None


class FolderLock:
    """An exclusive OS lock on `{folder}/{name}`, held while a run writes the folder.

    The OS releases it when the process dies (even on kill -9), so a stale lock never blocks a
    resume; a live holder is named in the error (its pid is written into the lock file, then
    `owner`: the launch it belongs to, which the other ranks of that launch read)."""

    def __init__(self, folder: str, name: str = ".artaug.lock", what: str = "run folder", owner: str = ""):
        self.path = os.path.join(folder, name)
        self.folder, self.what, self.owner = folder, what, owner
        self._fd: int | None = None

    def acquire(self, wait: bool = False, retry_seconds: float = 0.0) -> FolderLock:
        """Take the lock; `wait`: block until a live holder releases it, else refuse at once, or
        after `retry_seconds` of retries (other ranks of a launch probe the lock, `held_lock`, for
        microseconds at a time)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, say so once
            logger.warning("no file locking on this platform: do not run two processes on %s", self.folder)
            return self
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + retry_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                lines = os.read(fd, 512).decode("ascii", "replace").splitlines()
                os.close(fd)
                raise self.refusal(lines[0].strip() if lines else "") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{self.owner}\n".encode() if self.owner else str(os.getpid()).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def refusal(self, holder: str) -> RunLockedError:
        """The error for a folder whose lock the process `holder` (its pid) holds."""
        return RunLockedError(f"{self.what} {self.folder} is in use by process {holder or 'another process'}; wait for "
                              "it to finish (or stop it), or use another folder")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
