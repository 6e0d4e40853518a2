"""The manifests of a pair dataset: one JSONL shard per rank, merged into manifest.jsonl."""

from __future__ import annotations

import glob
import os

from ..files import atomic_write_bytes, json_line, read_jsonl


def read_manifest(path: str, repair: bool = False) -> list[dict]:
    """Records of a JSONL manifest; a torn last line (no newline) is ignored, or cut off if `repair`;
    a corrupt line elsewhere raises naming the file and line."""
    return read_jsonl(path, repair=repair, what="manifest")


def shard_path(run_dir: str, rank: int, world: int) -> str:
    return os.path.join(run_dir, "shards", f"manifest-rank{rank:05d}-of-{world:05d}.jsonl")


def finished_ids(run_dir: str) -> set[str]:
    done = set()
    for p in glob.glob(os.path.join(run_dir, "shards", "manifest-rank*.jsonl")):
        done.update(r["id"] for r in read_manifest(p))
    return done


def merge_manifests(run_dir: str) -> int:
    """Merge every shard into manifest.jsonl (ordered by item, one line per item); returns lines."""
    records = {}
    for p in sorted(glob.glob(os.path.join(run_dir, "shards", "manifest-rank*.jsonl"))):
        for r in read_manifest(p):
            records.setdefault(r["id"], r)
    ordered = [records[k] for k in sorted(records)]
    atomic_write_bytes(os.path.join(run_dir, "manifest.jsonl"), b"".join(json_line(r) for r in ordered), shared=True)
    return len(ordered)


def all_ranks_done(run_dir: str, world: int) -> bool:
    return all(os.path.exists(os.path.join(run_dir, "shards", f"done-rank{r:05d}-of-{world:05d}")) for r in range(world))


def summarize(run_dir: str, quality_keys=()) -> dict:
    """Counts over all shards: items, enhanced, kept, how often the enhanced image scored higher,
    and the critic's suggestions: made, usable, and dropped as identities (local prompt = global prompt)."""
    records = []
    for p in sorted(glob.glob(os.path.join(run_dir, "shards", "manifest-rank*.jsonl"))):
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
