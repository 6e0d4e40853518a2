"""Measure what the scene grammar's words look like on the tiny model's training scenes: the
table the heuristic critic reads (`artaug_ext/assets/word_looks.json`).

    python benchmarks/calibrate_critic.py            # rewrites artaug_ext/assets/word_looks.json
    python benchmarks/calibrate_critic.py --check    # exit 1 when the shipped table differs

Training scenes only: `scenes.random_scene(seed, held_out=False)` for seeds 0..N-1 (the DiT's
training scenes), rendered at 256 px and read at 128 px by the critic's own readings
(`artaug_ext.word_looks`). This script may use `scenes.render` and the scenes' masks;
the critic never does: it reads the table this writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

from artaug_ext import scenes
from artaug_ext import word_looks as wl
from artaug_ext.interact.critics import UNIFORM_CONTRAST, region_stats

SCENES = 1000
RENDER_SIZE = 256
TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artaug_ext", "assets",
                     "word_looks.json")


def _round(v, digits=3):
    return [round(float(x), digits) for x in v] if np.ndim(v) else round(float(v), digits)


def training_scenes(n: int = SCENES) -> list[scenes.Scene]:
    return [scenes.random_scene(seed, held_out=False) for seed in range(n)]


def calibrate(scene_list: list[scenes.Scene]) -> dict:
    """The table, from these (training) scenes."""
    # 1. regions: the box each (position, size) object covers, from the renderer's own coverage
    regions: dict[str, list[float]] = {}
    for scene in scene_list:
        for o in scene.objects:
            cx, cy = scenes.POSITIONS[o.position]
            cov = scenes.shape_coverage(o.shape, cx, cy, scenes.SIZES[o.size], wl.SIZE)
            ys, xs = np.nonzero(cov > 0)
            box = [xs.min() / wl.SIZE, ys.min() / wl.SIZE, (xs.max() + 1) / wl.SIZE, (ys.max() + 1) / wl.SIZE]
            key = f"{o.position}|{o.size}"
            old = regions.get(key, box)
            regions[key] = [min(old[0], box[0]), min(old[1], box[1]), max(old[2], box[2]), max(old[3], box[3])]
    # 2. what the critic's readings see in each object and background
    areas, labs, bgs, shapes, speckles = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list), []
    cells = defaultdict(list)
    for scene in scene_list:
        px = wl.read_pixels(scenes.render(scene, RENDER_SIZE))
        cells[scene.lighting] += [region_stats(c) for c in wl.grid_cells(px)]
        boxes = [regions[f"{o.position}|{o.size}"] for o in scene.objects]
        bg = wl.background_model(px, boxes)
        bgs[f"{scene.background}|{scene.background_style}|{scene.lighting}"].append(wl.border_lab(px))
        for i, o in enumerate(scene.objects):
            r = wl.read_object(px, bg, boxes[i], boxes[:i] + boxes[i + 1:])
            areas[f"{o.shape}|{o.size}"].append(r.area)
            if r.lab is None:
                continue
            labs[f"{o.colour}|{scene.lighting}"].append(r.lab)
            shapes[o.shape].append((r.extent, r.solidity))
            speckles.append(r.speckle)

    def look(samples):
        centre = np.median(np.array(samples), axis=0)
        return {"lab": _round(centre, 2), "spread": _round(max(wl.delta_e(s, centre) for s in samples), 2),
                "n": len(samples)}

    return {
        "source": f"benchmarks/calibrate_critic.py: scenes.random_scene(seed, held_out=False) for seeds 0..{len(scene_list) - 1}"
                  f" (training scenes), rendered at {RENDER_SIZE} px, read at {wl.SIZE} px",
        "scenes": len(scene_list),
        "regions": {k: _round(v, 4) for k, v in sorted(regions.items())},
        "areas": {k: _round(np.percentile(v, 5), 5) for k, v in sorted(areas.items())},
        "objects": {k: look(v) for k, v in sorted(labs.items())},
        "backgrounds": {k: look(v) for k, v in sorted(bgs.items())},
        "shapes": {k: {"extent": _round(np.percentile([e for e, _ in v], [1, 99])),
                       "solidity": _round(np.percentile([s for _, s in v], [1, 99]))} for k, v in sorted(shapes.items())},
        "speckle": _round(max(speckles), 4),
        "lightings": {light: _lighting_bands(v) for light, v in sorted(cells.items())},
    }


def _lighting_bands(stats: list[dict]) -> dict:
    """Per lighting word, the 1st..99th percentile of the heuristic scorer's 3x3-cell readings:
    exposure over every cell, contrast, saturation and sharpness over cells that are not plain."""
    textured = [s for s in stats if s["contrast"] >= UNIFORM_CONTRAST]
    out = {"exposure": _round(np.percentile([s["exposure"] for s in stats], [1, 99])), "cells": len(stats)}
    for key in ("contrast", "saturation", "sharpness"):
        out[key] = _round(np.percentile([s[key] for s in textured], [1, 99]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=SCENES)
    p.add_argument("--check", action="store_true", help="compare with the shipped table instead of writing it")
    p.add_argument("--out", default=TABLE)
    args = p.parse_args(argv)
    found = calibrate(training_scenes(args.scenes))
    if args.check:
        with open(args.out, encoding="utf-8") as f:
            same = json.load(f) == found
        print("the shipped table is what this script measures" if same else f"{args.out} differs: rerun without --check")
        return 0 if same else 1
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(found, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.out} from {args.scenes} training scenes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
