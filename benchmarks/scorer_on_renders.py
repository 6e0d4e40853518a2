"""The filter on exact renders (issue 21, point 2): the analyser's lighting accuracy, and the
heuristic scorer's quality of each faithful lighting against the same scene in normal light.

    python benchmarks/scorer_on_renders.py [--heldout 200]

On the exact renders (`scenes.render`, 256 px) of the first N `tiny-heldout-lit` scenes (N/5 per
lighting). "before" is the scorer's reading for prompts outside the grammar, its only reading
before it read prompts; the analyser had no lighting reading before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np
from PIL import Image

from artaug_ext import analyse, scenes
from artaug_ext.eval.prompts import read_prompt_set
from artaug_ext.interact.scorers import HeuristicScorer


def measure(n: int) -> dict:
    scorer = HeuristicScorer()
    rows: dict[str, dict[str, list]] = {}
    for item in read_prompt_set(f"tiny-heldout-lit:{n}"):
        s = item.scene
        faithful = Image.fromarray(scenes.render(s, 256))
        normal = Image.fromarray(scenes.render(dataclasses.replace(s, lighting="normal"), 256))
        r = rows.setdefault(s.lighting, {k: [] for k in ("lighting_read", "quality", "quality_normal",
                                                         "quality_before", "quality_normal_before")})
        r["lighting_read"].append(analyse.analyse(faithful, s).lighting == s.lighting)
        r["quality"].append(scorer.quality(faithful, s.caption))
        r["quality_normal"].append(scorer.quality(normal, s.caption))
        r["quality_before"].append(scorer.quality(faithful, ""))
        r["quality_normal_before"].append(scorer.quality(normal, ""))
    out = {light: {"n": len(v["quality"]), **{k: round(float(np.mean(x)), 4) for k, x in v.items()}}
           for light, v in rows.items()}
    out["all"] = {"lighting_read": round(float(np.mean([x for v in rows.values() for x in v["lighting_read"]])), 4)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heldout", type=int, default=200)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.heldout), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
