"""`artaug eval-tiny`: does the tiny model draw what its prompt says?

Generates held-out prompts (single-object attribute combinations the training scenes never
contain, see `scenes.is_held_out`), reads each image with the pixel analyser and reports the
match rate per attribute next to the chance rate; then renders the same scenes with `dim`
and with `bright` light and counts how often the bright one is brighter.
"""

from __future__ import annotations

import logging
import os
import time

from . import analyse, scenes

logger = logging.getLogger(__name__)


def held_out_prompts(n: int) -> list[scenes.Scene]:
    return [scenes.held_out_scene(i) for i in range(n)]


def lighting_pairs(n: int) -> list[tuple[scenes.Scene, scenes.Scene]]:
    return [(scenes.held_out_scene(1000 + i, "dim"), scenes.held_out_scene(1000 + i, "bright")) for i in range(n)]


def evaluate(pipe, n_prompts: int = 64, n_lighting: int = 32, size: int | None = None, steps: int | None = None,
             seed: int = 0, progress: bool = True, keep_images: int = 0) -> dict:
    """Match rates of generated images against their prompts (and the lighting test)."""
    from tqdm import tqdm

    from .pipeline import generate

    def gen(prompt: str, i: int):
        return generate(pipe, prompt, seed=seed + i, steps=steps, height=size, width=size, progress=False)

    t0 = time.perf_counter()
    hits = {k: 0 for k in analyse.ATTRIBUTES}
    kept = []
    prompts = held_out_prompts(n_prompts)
    swaps = 0
    for i, scene in enumerate(tqdm(prompts, desc="held-out prompts", disable=not progress)):
        image = gen(scene.caption, i)
        found = analyse.analyse(image, scene)
        for k, ok in analyse.matches(found, scene).items():
            hits[k] += ok
        # Object and background colours exchanged: the binding error, apart from wrong colours.
        swaps += found.colour == scene.background and found.background == scene.main.colour
        if len(kept) < keep_images:
            kept.append((image, scene.caption))
    brighter = 0
    for i, (dim, bright) in enumerate(tqdm(lighting_pairs(n_lighting), desc="dim vs bright", disable=not progress)):
        b_dim = analyse.analyse(gen(dim.caption, 1000 + i)).brightness
        b_bright = analyse.analyse(gen(bright.caption, 1000 + i)).brightness  # same seed: same noise
        brighter += b_bright > b_dim
    chance = analyse.chance_rates()
    result = {
        "model": getattr(pipe, "artaug_model_name", "?"),
        "prompts": n_prompts,
        "attributes": {k: {"match": hits[k] / max(n_prompts, 1), "chance": chance[k]} for k in analyse.ATTRIBUTES},
        "colour_swaps": swaps / max(n_prompts, 1),
        "lighting": {"pairs": n_lighting, "bright_brighter": brighter / max(n_lighting, 1), "chance": 0.5},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if keep_images:
        result["_images"] = kept
    return result


def format_report(result: dict) -> str:
    lines = [f"model {result['model']}: {result['prompts']} held-out prompts (one object each)",
             f"{'attribute':<12}{'match':>8}{'chance':>8}"]
    for k, v in result["attributes"].items():
        lines.append(f"{k:<12}{v['match']:>8.1%}{v['chance']:>8.1%}")
    light = result["lighting"]
    lines.append(f"{'lighting':<12}{light['bright_brighter']:>8.1%}{light['chance']:>8.1%}"
                 f"   ('bright' brighter than 'dim', {light['pairs']} pairs)")
    lines.append(f"object and background colours swapped in {result['colour_swaps']:.1%} ({result['seconds']:.0f}s)")
    return "\n".join(lines)


def save_grid(images_and_captions, path: str, columns: int = 4, cell: int = 192) -> None:
    """A grid of images with their captions underneath (for the README)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    text_h = 44
    rows = (len(images_and_captions) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(images_and_captions):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        grid.paste(image.convert("RGB").resize((cell, cell)), (x, y))
        for j, line in enumerate(textwrap.wrap(caption, 32)[:4]):
            draw.text((x + 4, y + cell + 2 + 10 * j), line, fill="black", font=font)
    tmp = path + ".tmp.png"
    grid.save(tmp)
    os.replace(tmp, path)
