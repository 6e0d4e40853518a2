"""Reading kept pairs: from an `artaug interact` run folder or an `artaug interact-export` folder."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from ..errors import FileFormatError, UsageError
from ..files import read_text_lines
from .manifest import read_manifest, shard_records


@dataclass(frozen=True)
class Pair:
    """One kept pair: the prompt, the original and the enhanced image files."""

    id: str
    prompt: str
    original: str
    enhanced: str
    gain: float | None = None


def _csv_rows(path: str) -> list[dict]:
    rows = []
    lines = read_text_lines(path, "metadata file")
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or not {"image", "prompt"} <= set(reader.fieldnames):
        raise FileFormatError(path, f"columns {reader.fieldnames} lack 'image' and 'prompt'",
                              "export the pairs again with `artaug interact-export`")
    for n, row in enumerate(reader, 2):
        if not row.get("image"):
            raise FileFormatError(f"{path}:{n}", "a row without an image", "fix or delete that row")
        rows.append(row)
    return rows


def read_pairs(path: str, kept_only: bool = True) -> list[Pair]:
    """The kept pairs of a pair dataset: a run folder of `artaug interact` (its manifest), or the
    output of `artaug interact-export` (original/ and enhanced/ with metadata.csv). Every image
    must exist; the error names the file that does not. `kept_only=False` (a run folder): every
    enhanced item, kept by the filter or not."""
    if os.path.isdir(os.path.join(path, "shards")) or os.path.isfile(os.path.join(path, "manifest.jsonl")):
        records = shard_records(path) if os.path.isdir(os.path.join(path, "shards")) else read_manifest(
            os.path.join(path, "manifest.jsonl"))
        pairs = [Pair(r["id"], r["prompt"], os.path.join(path, r["original"]), os.path.join(path, r["enhanced"]),
                      r.get("gain")) for r in records if (r.get("kept") or not kept_only) and r.get("enhanced")]
    elif os.path.isfile(os.path.join(path, "original", "metadata.csv")):
        originals = _csv_rows(os.path.join(path, "original", "metadata.csv"))
        enhanced = _csv_rows(os.path.join(path, "enhanced", "metadata.csv"))
        if len(originals) != len(enhanced):
            raise FileFormatError(path, f"{len(originals)} originals but {len(enhanced)} enhanced images in the "
                                  "metadata.csv files", "export the pairs again with `artaug interact-export`")
        pairs = []
        for o, e in zip(originals, enhanced, strict=True):
            if o["prompt"] != e["prompt"]:
                raise FileFormatError(path, f"the pair {o['image']} / {e['image']} has two prompts",
                                      "export the pairs again with `artaug interact-export`")
            pairs.append(Pair(o["image"].split(".")[0], o["prompt"], os.path.join(path, "original", o["image"]),
                              os.path.join(path, "enhanced", e["image"])))
    else:
        raise UsageError(f"{path}: not a pair dataset (neither a run folder of `artaug interact` nor an "
                         "`artaug interact-export` folder with original/metadata.csv)")
    for p in pairs:
        for image in (p.original, p.enhanced):
            if not os.path.isfile(image):
                raise FileFormatError(image, "missing image of a kept pair",
                                      "restore it, or run `artaug interact` again on the same folder")
    return pairs
