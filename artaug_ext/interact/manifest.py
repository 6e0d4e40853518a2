"""The manifests of a pair dataset: one JSONL shard per rank, merged into manifest.jsonl.

A shard grows one line per finished item, so a torn last line is an interrupted append and
is cut off on resume, until its rank has written its done marker; manifest.jsonl is written
whole, so any damage to it is damage, and it is merged again from the shards.
"""

from __future__ import annotations

import glob
import logging
import os

from ..errors import FileFormatError
from ..files import atomic_write_bytes, json_line, read_jsonl

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
SHARD_FIX = "delete that line (its item is made again by the next `artaug interact` or `artaug run`) or restore the file"


def read_manifest(path: str, repair: bool = False) -> list[dict]:
    """Records of a manifest: a shard (under shards/: a torn last line is an interrupted append
    while its rank has not finished; cut off if `repair`) or a merged manifest.jsonl (written
    whole: any damaged line raises). A damaged line raises naming the file and line."""
    if os.path.basename(os.path.dirname(os.path.abspath(path))) == "shards":
        return read_jsonl(path, repair=repair, what="manifest shard", appended=not os.path.exists(_done_marker(path)),
                          fix=SHARD_FIX)
    return read_jsonl(path, what="manifest", appended=False,
                      fix="delete it: it is merged again from the folder's shards/ on the next run")


def _done_marker(shard: str) -> str:
    """shards/manifest-rank{r}-of-{w}.jsonl -> shards/done-rank{r}-of-{w}: written when rank r finished."""
    name = os.path.basename(shard)
    return os.path.join(os.path.dirname(shard), "done-" + name[len("manifest-"):-len(".jsonl")])


def shard_path(run_dir: str, rank: int, world: int) -> str:
    return os.path.join(run_dir, "shards", f"manifest-rank{rank:05d}-of-{world:05d}.jsonl")


def done_path(run_dir: str, rank: int, world: int) -> str:
    return _done_marker(shard_path(run_dir, rank, world))


def _shards(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(run_dir), "shards", "manifest-rank*.jsonl")))


def finished_ids(run_dir: str) -> set[str]:
    done = set()
    for p in _shards(run_dir):
        done.update(r["id"] for r in read_manifest(p))
    return done


def shard_records(run_dir: str) -> list[dict]:
    """Every shard's records, one per item (the first), ordered by item."""
    records = {}
    for p in _shards(run_dir):
        for r in read_manifest(p):
            records.setdefault(r["id"], r)
    return [records[k] for k in sorted(records)]


def merge_manifests(run_dir: str) -> int:
    """Merge every shard into manifest.jsonl (ordered by item, one line per item); returns lines."""
    ordered = shard_records(run_dir)
    atomic_write_bytes(os.path.join(run_dir, MANIFEST), b"".join(json_line(r) for r in ordered), shared=True)
    return len(ordered)


def merged_manifest(run_dir: str) -> list[dict]:
    """The records of a finished pair dataset's manifest.jsonl. One that is damaged or missing
    is merged again from the shards (which a finished run keeps), with a warning naming it; when
    it cannot be, the error names the damaged file."""
    path = os.path.join(run_dir, MANIFEST)
    try:
        if os.path.isfile(path) or not _shards(run_dir):
            return read_manifest(path)
        problem = "is missing"
    except FileFormatError as e:
        problem = f"is damaged ({e.problem})"
    if not _shards(run_dir):
        raise FileFormatError(path, f"this manifest {problem.removeprefix('is ')} and there are no shards to merge it "
                              "from", "restore it, or delete the folder and run `artaug interact` (or the round) again")
    logger.warning("%s %s: merging it again from %s", path, problem, os.path.join(run_dir, "shards"))
    merge_manifests(run_dir)
    return read_manifest(path)


def all_ranks_done(run_dir: str, world: int) -> bool:
    return all(os.path.exists(done_path(run_dir, r, world)) for r in range(world))


def summarize(run_dir: str, quality_keys=()) -> dict:
    """Counts over all shards: items, enhanced, kept, how often the enhanced image scored higher,
    and the critic's suggestions: made, usable, and dropped as identities (local prompt = global prompt)."""
    records = []
    for p in _shards(run_dir):
        records += read_manifest(p)
    enhanced = [r for r in records if r.get("enhanced")]
    prefer = 0
    for r in enhanced:
        keys = list(quality_keys) or [k for k in r["scores"]["original"] if k in ("quality", "aesthetic", "pickscore")]
        if keys and all(r["scores"]["enhanced"][k] > r["scores"]["original"][k] for k in keys):
            prefer += 1
    usable = sum(len(r.get("suggestions", ())) for r in records)
    identities = sum(r.get("identity_suggestions", 0) for r in records)
    return {"items": len(records), "enhanced": len(enhanced), "kept": sum(bool(r.get("kept")) for r in records),
            "suggestions": usable + identities, "usable_suggestions": usable, "identity_suggestions": identities,
            "enhanced_preferred": prefer,
            "preference_rate": round(prefer / len(enhanced), 4) if enhanced else None}
