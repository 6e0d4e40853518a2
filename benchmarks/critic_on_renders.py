"""The heuristic critic on exact renders: how often it flags a faithful image, and how often it
finds an object that was altered (issue 21, point 1).

    python benchmarks/critic_on_renders.py [--heldout 250] [--multi 200] [--out critic.json]

- suggestions per image on the exact renders (`scenes.render`, 256 px) of the first N
  `tiny-heldout-lit` scenes, by lighting, and of multi-object scenes (2 or 3 objects,
  `scenes.random_scene(9_000_000 + i, held_out=None)`: seeds apart from the calibration's);
- on the same multi-object renders with one object recoloured away from its named colour,
  removed, or relit to another lighting under which it looks visibly different: the share of images with a suggestion whose box
  covers the altered object (every pixel it covers at least half).
"now" is `make_critic("heuristic")`; "light meter" is the same critic's reading for prompts
outside the grammar, which was its only reading before (the figures before the change).
The images are built with the renderer and the scenes' masks: that is this script's
knowledge, never the critic's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys

import numpy as np
from PIL import Image

from artaug_ext import scenes
from artaug_ext.analyse import srgb_to_lab
from artaug_ext.eval.prompts import read_prompt_set
from artaug_ext.interact.critics import make_critic

SIZE = 256
ALTERATIONS = ("recoloured", "removed", "relit")
VISIBLE_CHANGE = 15.0  # Delta E*ab: a relit object must look different


def heldout_scenes(n: int) -> list[scenes.Scene]:
    return [item.scene for item in read_prompt_set(f"tiny-heldout-lit:{n}")]


def multi_object_scenes(n: int) -> list[scenes.Scene]:
    out, seed = [], 9_000_000
    while len(out) < n:
        scene = scenes.random_scene(seed, held_out=None)
        seed += 1
        if len(scene.objects) > 1:
            out.append(scene)
    return out


def coverage(obj: scenes.ShapeSpec, size: int = SIZE) -> np.ndarray:
    cx, cy = scenes.POSITIONS[obj.position]
    return scenes.shape_coverage(obj.shape, cx, cy, scenes.SIZES[obj.size], size)


def altered(scene: scenes.Scene, how: str, index: int) -> tuple[Image.Image, np.ndarray]:
    """The render of `scene` with one object (picked by `index`) altered, and that object's
    coverage (what a suggestion's box must cover)."""
    rng = random.Random(f"{how}|{index}")
    j = rng.randrange(len(scene.objects))
    obj = scene.objects[j]
    cov = coverage(obj)
    if how == "recoloured":
        colour = rng.choice([c for c in scenes.COLOURS if c not in (obj.colour, scene.background)])
        objects = [dataclasses.replace(o, colour=colour) if k == j else o for k, o in enumerate(scene.objects)]
        image = scenes.render(dataclasses.replace(scene, objects=objects), SIZE)
    elif how == "removed":
        image = scenes.render(dataclasses.replace(scene, objects=scene.objects[:j] + scene.objects[j + 1:]), SIZE)
        if j == 0:  # the main object gone: the backlit halo stays where the prompt put it
            image = np.where(cov[..., None] > 0, image, scenes.render(scene, SIZE))
    elif how == "relit":
        light = rng.choice(visible_relightings(scene, j))
        relit = scenes.render(dataclasses.replace(scene, lighting=light), SIZE).astype(np.float64)
        exact = scenes.render(scene, SIZE).astype(np.float64)
        image = np.round(exact * (1 - cov[..., None]) + relit * cov[..., None]).astype(np.uint8)
    else:
        raise ValueError(how)
    return Image.fromarray(np.asarray(image, dtype=np.uint8)), cov


def visible_relightings(scene: scenes.Scene, j: int) -> list[str]:
    """The other lightings under which object j looks visibly different (Delta E*ab of its lit
    colour at least VISIBLE_CHANGE): white in normal light and overexposed are both near white,
    dim light and backlit both halve a colour, so relighting between them alters nothing."""
    def lab(light):
        return srgb_to_lab(scenes.lit_layers(dataclasses.replace(scene, lighting=light), 8)[1][j].astype(np.float64))

    own = lab(scene.lighting)
    return [x for x in scenes.LIGHTINGS if x != scene.lighting
            and float(np.sqrt(((lab(x) - own) ** 2).sum())) >= VISIBLE_CHANGE]


def covers(box, cov: np.ndarray) -> bool:
    """Does a normalised box hold every pixel (centre) the object covers at least half?"""
    ys, xs = np.nonzero(cov >= 0.5)
    n = cov.shape[0]
    cx, cy = (xs + 0.5) / n, (ys + 0.5) / n
    x0, y0, x1, y1 = box
    return bool(((cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)).all())


def suggestion_counts(critique, scene_list) -> list[int]:
    return [len(critique(Image.fromarray(scenes.render(s, SIZE)), s.caption).suggestions) for s in scene_list]


def hit_rate(critique, scene_list, how: str) -> float:
    hits = 0
    for i, scene in enumerate(scene_list):
        image, cov = altered(scene, how, i)
        hits += any(covers(s.box, cov) for s in critique(image, scene.caption).suggestions)
    return hits / len(scene_list)


def measure(critique, heldout: list, multi: list) -> dict:
    counts = suggestion_counts(critique, heldout)
    by_light = {}
    for scene, c in zip(heldout, counts, strict=True):
        by_light.setdefault(scene.lighting, []).append(c)
    return {"heldout_per_image": {k: round(float(np.mean(v)), 3) for k, v in by_light.items()},
            "heldout_images": {k: len(v) for k, v in by_light.items()},
            "multi_per_image": round(float(np.mean(suggestion_counts(critique, multi))), 3),
            "multi_images": len(multi),
            "hit_rate": {how: round(hit_rate(critique, multi, how), 3) for how in ALTERATIONS}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heldout", type=int, default=250)
    p.add_argument("--multi", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    critic = make_critic("heuristic")
    heldout, multi = heldout_scenes(args.heldout), multi_object_scenes(args.multi)
    result = {"now": measure(critic.critique, heldout, multi),
              "light meter": measure(lambda im, prompt: critic._light_meter(im, prompt), heldout, multi),
              "command": "python benchmarks/critic_on_renders.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
