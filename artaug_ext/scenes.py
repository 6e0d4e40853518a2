"""Procedural scenes: simple shapes with English captions, deterministic from a seed.

They are the training data of the embedded `tiny` FLUX model and the ground truth of the
caption-fidelity analyser (`artaug_ext.analyse`), so the generator returns the structured
description next to the image and the caption.

Grammar (every word is in `artaug_ext.tiny.vocab`, so both tiny tokenizers know it):

    caption    := object ( ", " object )* [ " and " object ] " on " article background [ ", " lighting ]
    object     := article [size " "] colour " " shape " " position
    article    := "a" | "an"                           ("an" before a vowel)
    size       := "small" | "large"                    (medium is unnamed)
    colour     := red | green | blue | yellow | white | black | orange | purple
    shape      := circle | square | triangle | star
    position   := "in the center" | "on the left" | "on the right" | "at the top" | "at the bottom"
                | "in the top left" | "in the top right" | "in the bottom left" | "in the bottom right"
    background := [ "dark " | "light " ] colour " background" | colour " gradient background"
    lighting   := "dim light" | "normal light" | "bright light" | "backlit" | "overexposed"

e.g. `a red circle on a blue background`, `a small yellow star in the top left on a dark green
background, dim light`. The first object is the main one (the largest, drawn last).
Some single-object combinations (colour, shape, position, background colour) are held out of
training (`is_held_out`) so `artaug eval-tiny` can test generalisation to unseen prompts.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from .colours import COLOURS as COLOUR_TABLE
from .colours import SCENE_COLOURS

# The colours scenes draw (sRGB in [0, 1]): the scene part of the one colour table.
PALETTE: dict[str, tuple[float, float, float]] = {name: COLOUR_TABLE[name] for name in SCENE_COLOURS}
COLOURS = list(PALETTE)
SHAPES = ["circle", "square", "triangle", "star"]
# Half-extent of the shape as a fraction of the image side.
SIZES = {"small": 0.10, "medium": 0.155, "large": 0.21}
# Centre of the shape's bounding box in (x, y), fractions of the image side, y down.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5), "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
    "bottom": (0.5, 0.75), "top left": (0.25, 0.25), "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75),
}
POSITION_PHRASES = {
    "center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
    "bottom": "at the bottom", "top left": "in the top left", "top right": "in the top right",
    "bottom left": "in the bottom left", "bottom right": "in the bottom right",
}
LIGHTINGS = ["normal", "dim", "bright", "backlit", "overexposed"]
LIGHTING_PHRASES = {"normal": "normal light", "dim": "dim light", "bright": "bright light",
                    "backlit": "backlit", "overexposed": "overexposed"}
BACKGROUND_STYLES = ["plain", "dark", "light", "gradient"]


@dataclass
class ShapeSpec:
    colour: str
    shape: str
    position: str
    size: str = "medium"


@dataclass
class Scene:
    """The structured description of a scene (what the caption says, exactly)."""

    objects: list[ShapeSpec]
    background: str
    background_style: str = "plain"
    lighting: str = "normal"
    say_lighting: bool = True
    seed: int = 0
    caption: str = field(default="")

    @property
    def main(self) -> ShapeSpec:
        return self.objects[0]

    def to_dict(self) -> dict:
        return asdict(self)


def describe(scene: Scene) -> str:
    """The English caption of a scene (see the module docstring for the grammar)."""
    parts = []
    for obj in scene.objects:
        size = "" if obj.size == "medium" else obj.size + " "
        words = f"{size}{obj.colour} {obj.shape}"
        article = "an" if words[0] in "aeiou" else "a"
        parts.append(f"{article} {words} {POSITION_PHRASES[obj.position]}")
    objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    bg = {"plain": f"{scene.background} background", "dark": f"dark {scene.background} background",
          "light": f"light {scene.background} background",
          "gradient": f"{scene.background} gradient background"}[scene.background_style]
    text = f"{objects} on {'an' if bg[0] in 'aeiou' else 'a'} {bg}"
    if scene.say_lighting:
        text += f", {LIGHTING_PHRASES[scene.lighting]}"
    return text


def parse_caption(text: str) -> Scene | None:
    """The scene a caption of the grammar describes (the inverse of `describe`), or None for
    text outside the grammar; the caption analyser scores images against it."""
    words = {"colour": "|".join(COLOURS), "shape": "|".join(SHAPES),
             "position": "|".join(re.escape(p) for p in POSITION_PHRASES.values())}
    obj = re.compile(rf"an? (?:(?P<size>small|large) )?(?P<colour>{words['colour']}) (?P<shape>{words['shape']}) "
                     rf"(?P<position>{words['position']})")
    lights = {phrase: name for name, phrase in LIGHTING_PHRASES.items()}
    m = re.fullmatch(rf"(?P<objects>.+) on an? (?P<style>dark |light )?(?P<bg>{words['colour']})(?P<gradient> gradient)? "
                     rf"background(?:, (?P<light>{'|'.join(map(re.escape, lights))}))?", text.strip())
    if m is None:
        return None
    parts = re.split(r", | and ", m.group("objects"))
    positions = {v: k for k, v in POSITION_PHRASES.items()}
    objects = []
    for part in parts:
        o = obj.fullmatch(part)
        if o is None:
            return None
        objects.append(ShapeSpec(o.group("colour"), o.group("shape"), positions[o.group("position")],
                                 o.group("size") or "medium"))
    style = "gradient" if m.group("gradient") else (m.group("style") or "plain ").strip()
    light = m.group("light")
    scene = Scene(objects=objects, background=m.group("bg"), background_style=style,
                  lighting=lights[light] if light else "normal", say_lighting=light is not None)
    scene.caption = describe(scene)
    return scene


def is_held_out(colour: str, shape: str, position: str, background: str) -> bool:
    """About 1 in 8 single-object combinations never appear in training (stable hash)."""
    key = f"{colour}|{shape}|{position}|{background}".encode()
    return zlib.crc32(key) % 8 == 0


def _valid_pair(colour: str, background: str) -> bool:
    return colour != background


def random_scene(seed: int, *, max_objects: int = 3, held_out: bool | None = False,
                 lighting: str | None = None) -> Scene:
    """A scene drawn from the grammar, deterministic from `seed`.

    held_out=False: training scenes (no object forms a held-out combination with the
    background); True: one-object scenes whose combination is held out; None: anything.
    """
    rng = random.Random(seed)
    for _ in range(1000):
        n = 1 if held_out else rng.choices([1, 2, 3][:max_objects], weights=[6, 3, 1][:max_objects])[0]
        background = rng.choice(COLOURS)
        style = rng.choices(BACKGROUND_STYLES, weights=[5, 2, 2, 2])[0]
        light = lighting or rng.choices(LIGHTINGS, weights=[4, 2, 2, 1, 1])[0]
        if style == "light" and light in ("bright", "overexposed"):
            continue  # washes the background to white: its colour is no longer visible
        if background in ("white", "black") and style in ("dark", "light"):
            style = "plain"
        positions = rng.sample(list(POSITIONS), n)
        objects = []
        for i, pos in enumerate(positions):
            # With several objects the first (main) one is the largest.
            size = rng.choice(list(SIZES)) if n == 1 else ("large" if i == 0 else "small")
            objects.append(ShapeSpec(colour=rng.choice(COLOURS), shape=rng.choice(SHAPES), position=pos, size=size))
        if n > 1 and _overlap(objects):
            continue
        if not all(_valid_pair(o.colour, background) for o in objects):
            continue
        flags = [is_held_out(o.colour, o.shape, o.position, background) for o in objects]
        if held_out is True and not flags[0]:
            continue
        if held_out is False and any(flags):
            continue
        scene = Scene(objects=objects, background=background, background_style=style, lighting=light,
                      say_lighting=light != "normal" or rng.random() < 0.5, seed=seed)
        scene.caption = describe(scene)
        return scene
    raise RuntimeError(f"no scene found for seed {seed}")


def _overlap(objects: list[ShapeSpec]) -> bool:
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
            gap = SIZES[a.size] + SIZES[b.size] + 0.02
            if abs(ax - bx) < gap and abs(ay - by) < gap:
                return True
    return False


def held_out_scene(index: int, lighting: str = "normal") -> Scene:
    """The `index`-th held-out evaluation scene (one object, plain background, no lighting word)."""
    rng = random.Random(10_000_000 + index)
    while True:
        colour, shape, pos, bg = (rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(list(POSITIONS)),
                                  rng.choice(COLOURS))
        if colour != bg and is_held_out(colour, shape, pos, bg):
            break
    scene = Scene(objects=[ShapeSpec(colour, shape, pos, "large")], background=bg, lighting=lighting,
                  say_lighting=lighting != "normal", seed=1)
    scene.caption = describe(scene)
    return scene


def held_out_multi_scene(index: int, lighting: str = "normal") -> Scene:
    """The `index`-th held-out scene of two or three objects: the main (large) object forms a
    held-out combination with the plain background, the small ones do not, so the main object's
    combination is the scene's only one never trained on (`random_scene(held_out=True)` draws
    one object only)."""
    rng = random.Random(20_000_000 + index)
    while True:
        n = rng.choice([2, 3])
        bg = rng.choice(COLOURS)
        objects = [ShapeSpec(rng.choice(COLOURS), rng.choice(SHAPES), pos, "large" if i == 0 else "small")
                   for i, pos in enumerate(rng.sample(list(POSITIONS), n))]
        flags = [is_held_out(o.colour, o.shape, o.position, bg) for o in objects]
        if (flags[0] and not any(flags[1:]) and all(_valid_pair(o.colour, bg) for o in objects)
                and not _overlap(objects)):
            break
    scene = Scene(objects=objects, background=bg, lighting=lighting, say_lighting=lighting != "normal", seed=1)
    scene.caption = describe(scene)
    return scene


# --------------------------------------------------------------------------------------------
# Rendering


def _polygon(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    if shape == "triangle":
        return np.array([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)])
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        pts = np.array(pts)
        # Centre the star's bounding box on (cx, cy), like the other shapes.
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        return pts + np.array([cx - (x0 + x1) / 2, cy - (y0 + y1) / 2])
    raise ValueError(shape)


def _inside_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over the pixels."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x0, y0 = poly[i]
        x1, y1 = poly[(i + 1) % n]
        cond = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= cond & (px < xint)
    return inside


def shape_coverage(shape: str, cx: float, cy: float, r: float, size: int, ss: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the shape ([size, size] float32), `ss`x`ss` supersampled."""
    cov = np.zeros((size, size), dtype=np.float32)
    x0, x1 = max(int((cx - r) * size) - 1, 0), min(int((cx + r) * size) + 2, size)
    y0, y1 = max(int((cy - r) * size) - 1, 0), min(int((cy + r) * size) + 2, size)
    if x0 >= x1 or y0 >= y1:
        return cov
    offs = (np.arange(ss) + 0.5) / ss
    xs = ((np.arange(x0, x1)[:, None] + offs[None]).reshape(-1)) / size
    ys = ((np.arange(y0, y1)[:, None] + offs[None]).reshape(-1)) / size
    py, px = np.meshgrid(ys, xs, indexing="ij")
    if shape == "circle":
        m = (px - cx) ** 2 + (py - cy) ** 2 <= r * r
    elif shape == "square":
        m = (np.abs(px - cx) <= r) & (np.abs(py - cy) <= r)
    else:
        m = _inside_polygon(px, py, _polygon(shape, cx, cy, r))
    m = m.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    cov[y0:y1, x0:x1] = m
    return cov


def background_image(scene: Scene, size: int) -> np.ndarray:
    base = np.array(PALETTE[scene.background], dtype=np.float32)
    if scene.background_style == "dark":
        base = base * 0.55
    elif scene.background_style == "light":
        base = base * 0.55 + 0.45
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if scene.background_style == "gradient":
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
        img = base * (1.15 - 0.45 * t)  # lighter at the top, darker at the bottom
    return np.clip(img, 0, 1)


def _apply_lighting(img: np.ndarray, obj_mask: np.ndarray, scene: Scene) -> np.ndarray:
    size = img.shape[0]
    light = scene.lighting
    if light == "dim":
        return img * 0.55
    if light == "bright":
        return img * 1.12 + 0.12
    if light == "overexposed":
        return img * 1.3 + 0.3
    if light == "backlit":
        cx, cy = POSITIONS[scene.main.position]
        yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
        glow = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.35 ** 2))[..., None]
        lit = img * (1 + 0.4 * glow) + 0.06 * glow  # a soft halo behind the subject
        m = obj_mask[..., None]
        return lit * (1 - m) + img * 0.5 * m
    return img


def render(scene: Scene, size: int = 128) -> np.ndarray:
    """The scene as a uint8 RGB array [size, size, 3]."""
    img = background_image(scene, size)
    obj_mask = np.zeros((size, size), dtype=np.float32)
    # Draw the main object last so it is never covered.
    for obj in list(scene.objects[1:]) + [scene.main]:
        cx, cy = POSITIONS[obj.position]
        cov = shape_coverage(obj.shape, cx, cy, SIZES[obj.size], size)
        colour = np.array(PALETTE[obj.colour], dtype=np.float32)
        img = img * (1 - cov[..., None]) + colour * cov[..., None]
        obj_mask = np.maximum(obj_mask, cov)
    img = _apply_lighting(img, obj_mask, scene)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def lit_layers(scene: Scene, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """What `render` shows where no object is, and in each object: the lit background alone
    ([size, size, 3]) and each object's lit colour ([objects, 3]), floats in [0, 1]. The fidelity
    judge segments images with them (its object mask)."""
    none = np.zeros((size, size), dtype=np.float32)
    background = np.clip(_apply_lighting(background_image(scene, size), none, scene), 0, 1)
    inside = np.ones((1, 1), dtype=np.float32)  # one pixel, fully covered: lighting is uniform on objects
    colours = [np.clip(_apply_lighting(np.array(PALETTE[o.colour], dtype=np.float32)[None, None], inside, scene),
                       0, 1)[0, 0] for o in scene.objects]
    return background, np.array(colours, dtype=np.float32)


def make_scene(seed: int, size: int = 128, **kwargs) -> tuple[np.ndarray, str, Scene]:
    """(image uint8 [size, size, 3], caption, structured description) for `seed`."""
    scene = random_scene(seed, **kwargs)
    return render(scene, size), scene.caption, scene


def caption_words() -> list[str]:
    """Every word the grammar can produce (for the tokenizer test)."""
    words = {"a", "an", "on", "and", "background", "gradient", "dark", "light", "small", "large", "in", "the", "at"}
    words |= set(COLOURS) | set(SHAPES)
    for phrase in list(POSITION_PHRASES.values()) + list(LIGHTING_PHRASES.values()):
        words |= set(phrase.split())
    return sorted(words)
