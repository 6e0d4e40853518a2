"""Kept pairs exported in the layout DiffSynth's trainer reads."""

from __future__ import annotations

import csv
import io
import math
import os
import shutil

from ..errors import UsageError
from ..files import atomic_write_bytes, json_line
from .manifest import merge_manifests, merged_manifest


def export_pairs(run_dir: str, out_dir: str, keep_fraction: float = 1.0, link: bool = True) -> int:
    """Kept pairs in the layout DiffSynth's trainer reads: `{out}/original/` and `{out}/enhanced/`,
    each with the images and `metadata.csv` / `metadata.jsonl` (columns `image`, `prompt`).

    `keep_fraction` < 1 keeps only the best share of kept pairs by quality gain. Returns the count.
    """
    if not 0 < keep_fraction <= 1:
        raise UsageError(f"--keep-fraction {keep_fraction} must be in (0, 1]")
    merge_manifests(run_dir)
    kept = [r for r in merged_manifest(run_dir) if r.get("kept") and r.get("enhanced")]
    kept.sort(key=lambda r: (-(r.get("gain") or 0.0), r["id"]))
    kept = sorted(kept[: math.ceil(len(kept) * keep_fraction)], key=lambda r: r["id"])
    for image_side in ("original", "enhanced"):
        folder = os.path.join(out_dir, image_side)
        os.makedirs(folder, exist_ok=True)
        rows = []
        for r in kept:
            name = os.path.basename(r[image_side])
            src, dst = os.path.join(run_dir, r[image_side]), os.path.join(folder, name)
            if not os.path.exists(dst):
                try:
                    if not link:
                        raise OSError
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            rows.append({"image": name, "prompt": r["prompt"]})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["image", "prompt"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(os.path.join(folder, "metadata.csv"), buf.getvalue().encode("utf-8"))
        atomic_write_bytes(os.path.join(folder, "metadata.jsonl"), b"".join(json_line(r) for r in rows))
    return len(kept)
