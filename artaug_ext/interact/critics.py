"""Understanding backends: look at an image and its prompt, return grounded suggestions.

Every backend has `critique(image, prompt) -> ParseResult`:

- `heuristic`: no model at all. It measures pixel statistics per region and proposes fixes
  in the tiny model's words. The default for CPU runs and tests; see `HeuristicCritic`.
- `openai`: any OpenAI-compatible chat-completions server with image input (vLLM, SGLang,
  DashScope) serving a grounding VLM (the paper uses Qwen2-VL-72B).
- `transformers`: Qwen2-VL / Qwen2.5-VL loaded locally with transformers.

The instruction sent to VLMs is one versioned file, `templates/critique_v1.txt`.
Each VLM backend knows its model's grounding convention (Qwen2-VL and Qwen3-VL: a 0-1000
grid; Qwen2.5-VL: absolute pixels of the image it saw after its processor's resize; GLM-V:
a 0-1000 grid) and which image size its coordinates refer to, and hands both to
`parse_suggestions`.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
from PIL import Image

from .. import scenes
from ..colours import COLOURS, rgb255
from ..errors import ArtaugError, UsageError
from .parse import ParseResult, Suggestion, parse_suggestions

logger = logging.getLogger(__name__)

TEMPLATE_VERSION = "v1"
CRITICS = ("heuristic", "openai", "transformers")


class CriticError(ArtaugError, RuntimeError):
    """A critic backend could not produce an answer (server error, bad configuration)."""


def instruction(prompt: str, max_suggestions: int = 3, version: str = TEMPLATE_VERSION) -> str:
    """The instruction for a VLM, from the versioned template file."""
    text = resources.files("artaug_ext.interact").joinpath(f"templates/critique_{version}.txt").read_text("utf-8")
    return text.format(prompt=prompt, max_suggestions=max_suggestions)


# ---------------------------------------------------------------------------- conventions

def convention_for(model: str) -> str:
    """Grounding convention of a model name: qwen2-vl, qwen2.5-vl, qwen3-vl or glm-v."""
    low = model.lower()
    if "glm" in low:
        return "glm-v"
    if "qwen3" in low:
        return "qwen3-vl"
    if "qwen2.5" in low or "qwen2_5" in low:
        return "qwen2.5-vl"
    return "qwen2-vl"


_MODEL_TYPES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl", "qwen3_vl_moe": "qwen3-vl",
                "glm4v": "glm-v", "glm4v_moe": "glm-v"}


def convention_of_config(config) -> str | None:
    """Grounding convention from a transformers config's `model_type`, None when unknown.
    More reliable than the name: a local folder's name rarely says Qwen2 or Qwen2.5."""
    return _MODEL_TYPES.get(str(getattr(config, "model_type", "")).lower())


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 1280 * 28 * 28) -> tuple[int, int]:
    """(height, width) Qwen2/2.5-VL's processor resizes an image to: multiples of `factor`
    within [min_pixels, max_pixels], aspect ratio kept as well as possible (Qwen's own rule)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def parse_for_convention(text: str, convention: str, sent_size: tuple[int, int], max_suggestions: int) -> ParseResult:
    """Parse an answer with the coordinate convention of the model that wrote it: only Qwen2.5-VL
    answers in absolute pixels (of the image it saw); the others use the 0-1000 grid."""
    coords = "abs" if convention == "qwen2.5-vl" else "rel1000"
    return parse_suggestions(text, sent_size, coords=coords, max_suggestions=max_suggestions)


# ---------------------------------------------------------------------------- heuristic

# Targets of the heuristic critic (and scorer): luma in [0, 1], contrast = luma std,
# sharpness = std of the luma Laplacian. A cell outside a band gets a fix; severity = distance.
EXPOSURE_BAND = (0.2, 0.75)
WASHED_OUT_SATURATION = 0.3  # bright AND unsaturated = overexposed (a bright yellow is not)
MIN_CONTRAST = 0.06
MIN_SATURATION = 0.35
SHARPNESS_BAND = (0.03, 0.15)
UNIFORM_CONTRAST = 0.03  # below this a cell is a plain area: only exposure is judged


def exposure_error(st: dict) -> float:
    """How far a cell is outside the exposure band: < 0 underexposed, > 0 overexposed, 0 fine.
    Luma alone would call saturated blues dark and yellows bright, so "over" also needs the
    colours to be washed out."""
    if st["exposure"] < EXPOSURE_BAND[0]:
        return st["exposure"] - EXPOSURE_BAND[0]
    if st["exposure"] > EXPOSURE_BAND[1] and st["saturation"] < WASHED_OUT_SATURATION:
        return st["exposure"] - EXPOSURE_BAND[1]
    return 0.0


# Lighting words of a prompt: the scenes' phrases, and the one fix word they lack.
LIGHTING_PHRASES = tuple(scenes.LIGHTING_PHRASES.values()) + ("underexposed",)


def prompt_content(prompt: str) -> str:
    """The prompt without its lighting phrases (the heuristic critic puts the fix there instead)."""
    text = prompt or ""
    for phrase in LIGHTING_PHRASES:
        text = re.sub(r",?\s*\b" + re.escape(phrase) + r"\b", "", text, flags=re.I)
    return " ".join(text.split()).strip(" ,")


_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")


def _position(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return _COLS[col]
    if col == 1:
        return _ROWS[row]
    return f"{_ROWS[row]} {_COLS[col]}"


def colour_name(rgb) -> str:
    """Name of the nearest colour of the colour table (8-bit sRGB in)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLOURS, key=lambda k: float(((np.asarray(rgb255(k)) - rgb) ** 2).sum()))


def region_stats(pixels: np.ndarray) -> dict[str, float]:
    """Exposure (mean luma), contrast (luma std), saturation (HSV-like), sharpness (Laplacian
    std) of an RGB float array in [0, 1], plus the mean colour."""
    luma = pixels @ np.array([0.299, 0.587, 0.114])
    mx, mn = pixels.max(-1), pixels.min(-1)
    sat = np.where(mx > 1e-6, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    if luma.shape[0] >= 3 and luma.shape[1] >= 3:
        lap = 4 * luma[1:-1, 1:-1] - luma[:-2, 1:-1] - luma[2:, 1:-1] - luma[1:-1, :-2] - luma[1:-1, 2:]
        sharp = float(lap.std())
    else:
        sharp = 0.0
    return {"exposure": float(luma.mean()), "contrast": float(luma.std()), "saturation": float(sat.mean()),
            "sharpness": sharp, "clipped": float(((luma > 0.97) | (luma < 0.03)).mean()),
            "colour": [float(v) for v in pixels.reshape(-1, 3).mean(0)]}


class HeuristicCritic:
    """An offline critic that judges the image against its prompt, without a model.

    A prompt of the tiny scene grammar (`scenes.parse_caption` reads it): the critic reads what
    the prompt asks for, each named object at its named position and the background under the
    named lighting, and flags only departures from it: an object that is missing, whose colour
    or shape is not the named one, or that is brighter or darker than the named lighting
    implies; speckles at an object's edge; a background brighter or darker than the named
    lighting implies. What it knows is what the words look like (`word_looks`, measured on
    training scenes), never how a scene is drawn. Each suggestion's box is its object's region
    and its local prompt is that object alone in the prompt's words (same background and
    lighting): it never asks for anything the prompt contradicts. In a one-object prompt, or for
    the background, that local prompt is the global prompt (the regional blend would be an
    identity); the interaction loop drops and counts such suggestions.

    Any other prompt, an empty one included (no attribute it can read): today's light meter,
    with NO understanding of content. It splits the image into a 3x3 grid, measures each cell's
    exposure, contrast, saturation and sharpness, and for the cells furthest from fixed targets
    proposes a standard fix in words the tiny model was trained on: the prompt's content with
    its lighting words replaced ("normal light", "bright light") plus words like "vivid",
    "sharp" and colour names (colour and position words without a prompt). Plain areas are
    judged on exposure only. Use it to exercise the loop end to end; use a VLM critic for real data.
    """

    name = "heuristic"

    def __init__(self, max_suggestions: int = 3, grid: int = 3, min_severity: float = 0.02):
        if grid != 3:
            raise ValueError("the heuristic critic names positions on a 3x3 grid")
        self.max_suggestions, self.grid, self.min_severity = max_suggestions, grid, min_severity

    def describe(self) -> dict:
        return {"critic": self.name, "max_suggestions": self.max_suggestions, "min_severity": self.min_severity}

    def _proposals(self, st: dict, where: str, content: str) -> list[tuple[float, str, str, str]]:
        """(severity, category, local prompt, rationale) candidates for one cell.

        The local prompt is the global prompt's content with its lighting words replaced by the
        fix (what the region should look like), or colour + position words without a prompt."""
        colour = colour_name([v * 255 for v in st["colour"]])
        hue = "" if colour in ("white", "black", "gray") else colour + " "

        def text(fix: str) -> str:
            return f"{content}, {fix}" if content else f"{fix} in the {where}"

        out = []
        err = exposure_error(st)
        if err > 0:
            out.append((2 * err, "exposure", text(f"normal light, soft {colour} tones"),
                        f"overexposed: mean brightness {st['exposure']:.2f}"))
        if err < 0:
            out.append((-2 * err, "exposure", text(f"bright light, clear {colour} details"),
                        f"underexposed: mean brightness {st['exposure']:.2f}"))
        if st["contrast"] < UNIFORM_CONTRAST:
            return out  # a plain area (a flat background) is not a flaw: only its exposure counts
        if st["contrast"] < MIN_CONTRAST:
            out.append((MIN_CONTRAST - st["contrast"], "lighting", text(f"dramatic light with strong contrast, {colour} shadows"),
                        f"flat: contrast {st['contrast']:.2f}"))
        if st["saturation"] < MIN_SATURATION:
            out.append((MIN_SATURATION - st["saturation"], "atmosphere", text(f"vivid {hue}colors, vibrant tones"),
                        f"dull colours: saturation {st['saturation']:.2f}"))
        if st["sharpness"] < SHARPNESS_BAND[0]:
            out.append((SHARPNESS_BAND[0] - st["sharpness"], "detail", text(f"sharp crisp {colour} details and texture"),
                        f"soft: sharpness {st['sharpness']:.3f}"))
        if st["sharpness"] > SHARPNESS_BAND[1]:
            out.append((min(st["sharpness"] - SHARPNESS_BAND[1], 0.5), "detail", text(f"clean smooth {colour} shapes, less noise"),
                        f"noisy: sharpness {st['sharpness']:.3f}"))
        return out

    def critique(self, image: Image.Image, prompt: str = "") -> ParseResult:
        scene = scenes.parse_caption(prompt) if prompt else None
        if scene is not None:
            return self._critique_scene(image, scene)
        return self._light_meter(image, prompt)

    def _critique_scene(self, image: Image.Image, scene: scenes.Scene) -> ParseResult:
        """A prompt of the scene grammar: departures from what it asks for (see the class docstring)."""
        found = scene_findings(image, scene)
        found.sort(key=lambda f: -f[0])
        out = [Suggestion(box=box, prompt=text, category=cat, rationale=why)
               for _sev, cat, text, why, box in found[:self.max_suggestions]]
        return ParseResult(out, "" if out else "the image shows what the prompt asks for, as far as the heuristic "
                                               "critic can read it")

    def _light_meter(self, image: Image.Image, prompt: str) -> ParseResult:
        """Today's light meter, for prompts outside the scene grammar."""
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
        h, w = pixels.shape[:2]
        content = prompt_content(prompt)
        found = []
        for r in range(3):
            for c in range(3):
                y0, y1 = h * r // 3, h * (r + 1) // 3
                x0, x1 = w * c // 3, w * (c + 1) // 3
                if y1 - y0 < 1 or x1 - x0 < 1:
                    continue
                st = region_stats(pixels[y0:y1, x0:x1])
                for sev, cat, text, why in self._proposals(st, _position(r, c), content):
                    found.append((sev, r * 3 + c, cat, text, why, (x0 / w, y0 / h, x1 / w, y1 / h)))
        found = [f for f in found if f[0] >= self.min_severity]
        # Worst first; one suggestion per cell; ties broken by cell index for determinism.
        found.sort(key=lambda f: (-round(f[0], 9), f[1]))
        used, out = set(), []
        for _sev, cell, cat, text, why, box in found:
            if cell in used:
                continue
            used.add(cell)
            out.append(Suggestion(box=box, prompt=text, category=cat, rationale=why))
            if len(out) >= self.max_suggestions:
                break
        return ParseResult(out, "" if out else "no region is far enough from the exposure/contrast/saturation/"
                                                   "sharpness targets to need a fix")


# What the scene reading tolerates beyond what training objects strayed (Delta E*ab); an object
# whose named colour and background are closer than VISIBLE under the named lighting cannot be
# told from its background, so it is not judged.
COLOUR_TOLERANCE = 10.0
BACKGROUND_TOLERANCE = 10.0
VISIBLE = 12.0
MISSING_AREA = 0.4  # an object covering less than this share of its word's least area is missing
SHAPE_MARGIN = 0.06  # how far outside its shape word's extent/solidity range an object may read
SPECKLE_MARGIN = 0.05  # speckled share of an edge allowed above the training maximum


def _object_caption(scene: scenes.Scene, obj: scenes.ShapeSpec) -> str:
    """One object of the scene alone, in the prompt's own words (background and lighting kept)."""
    return scenes.describe(scenes.Scene(objects=[obj], background=scene.background,
                                        background_style=scene.background_style, lighting=scene.lighting,
                                        say_lighting=scene.say_lighting))


def _outside(value: float, band) -> float:
    lo, hi = band
    return lo - value if value < lo else (value - hi if value > hi else 0.0)


def scene_findings(image: Image.Image, scene: scenes.Scene) -> list[tuple[float, str, str, str, tuple]]:
    """(severity, category, local prompt, rationale, box) for each departure of the image from
    the scene its prompt describes: at most one per object (the worst) and one for the background."""
    from .. import word_looks as wl

    table = wl.table()
    px = wl.read_pixels(image)
    light = scene.lighting
    light_words = scenes.LIGHTING_PHRASES[light]
    boxes = [table["regions"][f"{o.position}|{o.size}"] for o in scene.objects]
    bg_model = wl.background_model(px, boxes)
    bg_look = table["backgrounds"].get(f"{scene.background}|{scene.background_style}|{light}")
    found = []
    for i, obj in enumerate(scene.objects):
        box = tuple(boxes[i])
        what = f"the {obj.colour} {obj.shape} {scenes.POSITION_PHRASES[obj.position]}"
        local = _object_caption(scene, obj)
        look = table["objects"].get(f"{obj.colour}|{light}")
        if look is None or bg_look is None or wl.delta_e(look["lab"], bg_look["lab"]) < VISIBLE:
            continue  # the words' looks are unknown, or the object cannot be told from its background
        r = wl.read_object(px, bg_model, box, boxes[:i] + boxes[i + 1:])
        least = table["areas"][f"{obj.shape}|{obj.size}"]
        if r.lab is None or r.area < MISSING_AREA * least:
            found.append((2.0, "composition", local, f"{what} is missing: nothing there stands out from the background",
                          box))
            continue
        candidates = []
        off = wl.delta_e(r.lab, look["lab"])
        if off > look["spread"] + COLOUR_TOLERANCE:
            under = {c: wl.delta_e(r.lab, v["lab"]) for k, v in table["objects"].items()
                     for c, lit in [k.split("|")] if lit == light}
            nearest = min(under, key=under.get)
            if nearest != obj.colour:
                candidates.append((1.0 + off / 100, "atmosphere", local,
                                   f"{what} looks {nearest}, not {obj.colour} (Delta E {off:.0f})"))
            else:
                way = "brighter" if r.lab[0] > look["lab"][0] else "darker"
                candidates.append((0.5 + off / 100, "exposure", local,
                                   f"{what} is {way} than {light_words!r} implies (L* {r.lab[0]:.0f}, "
                                   f"expected {look['lab'][0]:.0f})"))
        if r.speckle > table["speckle"] + SPECKLE_MARGIN:
            candidates.append((0.3 + r.speckle, "detail", local,
                               f"speckles at the edge of {what} ({r.speckle:.0%} of its edge pixels)"))
        else:  # speckled edges make the outline unreadable: its shape is judged only when clean
            bands = table["shapes"][obj.shape]
            miss = max(_outside(r.extent, bands["extent"]), _outside(r.solidity, bands["solidity"]))
            if miss > SHAPE_MARGIN:
                nearest = min(table["shapes"], key=lambda shape, r=r: _outside(r.extent, table["shapes"][shape]["extent"])
                              + _outside(r.solidity, table["shapes"][shape]["solidity"]))
                if nearest != obj.shape:
                    candidates.append((0.8 + miss, "composition", local, f"{what} looks like a {nearest}"))
        if candidates:
            found.append(max(candidates, key=lambda c: c[0]) + (box,))
    if bg_look is not None:
        lab = wl.border_lab(px)
        off = wl.delta_e(lab, bg_look["lab"])
        if off > bg_look["spread"] + BACKGROUND_TOLERANCE:
            way = "brighter" if lab[0] > bg_look["lab"][0] else "darker"
            found.append((0.5 + off / 100, "exposure", scene.caption,
                          f"the background is {way} than {light_words!r} implies (L* {lab[0]:.0f}, expected "
                          f"{bg_look['lab'][0]:.0f})", (0.0, 0.0, 1.0, 1.0)))
    return found


# ---------------------------------------------------------------------------- openai

def image_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAICritic:
    """A grounding VLM behind an OpenAI-compatible chat-completions endpoint.

    base_url: e.g. http://localhost:8000/v1 (vLLM) or DashScope's compatible-mode URL; the key
    comes from the environment variable `api_key_env` (default OPENAI_API_KEY; none is fine for
    a local server). Retries 5xx answers, timeouts and dropped connections `max_retries` times
    with exponential backoff; a 4xx is a configuration error and raises at once. At most
    `max_concurrency` requests are in flight per critic (threads share it).
    For Qwen2.5-VL the image is resized here to its multiple-of-28 "smart resize" size, so the
    absolute `bbox_2d` pixels it answers in refer to a size we know.
    """

    name = "openai"

    def __init__(self, base_url: str | None = None, model: str | None = None, *, api_key_env: str = "OPENAI_API_KEY",
                 convention: str | None = None, timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0,
                 max_concurrency: int = 4, max_suggestions: int = 3, max_tokens: int = 1024,
                 skip_special_tokens: bool = False, min_pixels: int = 4 * 28 * 28, max_pixels: int = 1280 * 28 * 28):
        self.base_url = (base_url or os.environ.get("ARTAUG_CRITIC_BASE_URL") or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
        self.model = model or os.environ.get("ARTAUG_CRITIC_MODEL") or ""
        if not self.base_url or not self.model:
            raise UsageError("the openai critic needs a base URL and a model: --critic-base-url/--critic-model "
                             "(or ARTAUG_CRITIC_BASE_URL / ARTAUG_CRITIC_MODEL)")
        self.api_key = os.environ.get(api_key_env, "")
        self.convention = convention or convention_for(self.model)
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.max_suggestions, self.max_tokens = max_suggestions, max_tokens
        self.skip_special_tokens = skip_special_tokens
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)

    def describe(self) -> dict:
        return {"critic": self.name, "model": self.model, "convention": self.convention,
                "template": TEMPLATE_VERSION, "max_suggestions": self.max_suggestions}

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """The image exactly as the model will see it (resized for Qwen2.5-VL's absolute boxes)."""
        if self.convention == "qwen2.5-vl":
            h, w = smart_resize(image.height, image.width, 28, self.min_pixels, self.max_pixels)
            if (w, h) != image.size:
                image = image.resize((w, h), Image.BICUBIC)
        return image

    def request_body(self, image: Image.Image, prompt: str) -> dict:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": instruction(prompt, self.max_suggestions)},
            ]}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        if not self.skip_special_tokens:
            body["skip_special_tokens"] = False  # vLLM/SGLang: keep Qwen2-VL's <|box_start|> tokens
        return body

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8")
        url = self.base_url + "/chat/completions"
        last, failures = "", 0
        while True:
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with self._slots, urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code == 400 and "skip_special_tokens" in detail and "skip_special_tokens" in body:
                    # A resend without the field, not a failure: it must work with max_retries=0 too.
                    logger.warning("server rejects skip_special_tokens; sending without it (Qwen2-VL box tokens may be stripped)")
                    body = {k: v for k, v in body.items() if k != "skip_special_tokens"}
                    data = json.dumps(body).encode("utf-8")
                    continue
                if e.code < 500 and e.code != 429:
                    raise CriticError(f"critic server {url} answered HTTP {e.code}: {detail.strip()} "
                                      f"(check --critic-model, the API key in the environment and the base URL)") from None
                last = f"HTTP {e.code}"
            except TimeoutError as e:
                last = f"timeout after {self.timeout}s ({e})"
            except urllib.error.URLError as e:
                last = f"connection failed: {e.reason}"
            except (ConnectionError, http.client.HTTPException, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {e}"
            failures += 1
            if failures > self.max_retries:
                raise CriticError(f"critic server {url} failed {failures} times; last: {last}")
            delay = self.backoff * 2 ** (failures - 1)
            logger.warning("critic request failed (%s); retry %d/%d in %.1fs", last, failures, self.max_retries, delay)
            time.sleep(delay)

    def critique(self, image: Image.Image, prompt: str) -> ParseResult:
        sent = self.prepare_image(image)
        answer = self._post(self.request_body(sent, prompt))
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return ParseResult([], f"the server's answer has no message content: {str(answer)[:200]}")
        if isinstance(text, list):  # content parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        return parse_for_convention(text, self.convention, sent.size, self.max_suggestions)

    def critique_many(self, items: list[tuple[Image.Image, str]]) -> list[ParseResult]:
        """Critique many images concurrently (at most `max_concurrency` requests in flight)."""
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(lambda it: self.critique(*it), items))


# ---------------------------------------------------------------------------- transformers

class TransformersCritic:
    """Qwen2-VL / Qwen2.5-VL run locally with transformers (bf16, `device_map`).

    Decodes with special tokens kept, so Qwen2-VL's `<|box_start|>` boxes survive; for
    Qwen2.5-VL the absolute boxes refer to the processor's resized size, read back from
    `image_grid_thw` (patch 14 per grid cell).
    """

    name = "transformers"

    def __init__(self, model, processor, *, convention: str = "qwen2-vl", max_suggestions: int = 3,
                 max_new_tokens: int = 512):
        self.model, self.processor = model, processor
        self.convention, self.max_suggestions, self.max_new_tokens = convention, max_suggestions, max_new_tokens

    @classmethod
    def from_pretrained(cls, path: str, *, device_map: str = "auto", torch_dtype=None, **kwargs) -> TransformersCritic:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(path, device_map=device_map,
                                                            dtype=torch_dtype or torch.bfloat16).eval()
        processor = AutoProcessor.from_pretrained(path)
        convention = kwargs.pop("convention", None) or convention_of_config(model.config) or convention_for(path)
        return cls(model, processor, convention=convention, **kwargs)

    def describe(self) -> dict:
        return {"critic": self.name, "convention": self.convention, "template": TEMPLATE_VERSION,
                "max_suggestions": self.max_suggestions}

    def critique(self, image: Image.Image, prompt: str) -> ParseResult:
        import torch

        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": instruction(prompt, self.max_suggestions)}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
        inputs = inputs.to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        answer = self.processor.batch_decode([new], skip_special_tokens=False)[0]
        for end in ("<|im_end|>", "<|endoftext|>"):
            answer = answer.split(end)[0]
        sent = image.size
        if "image_grid_thw" in inputs:
            _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
            patch = getattr(getattr(self.processor, "image_processor", None), "patch_size", 14) or 14
            sent = (gw * patch, gh * patch)
        result = parse_for_convention(answer, self.convention, sent, self.max_suggestions)
        if not result.suggestions:
            logger.debug("transformers critic answer without suggestions: %r", answer[:300])
        return result


def make_critic(name: str, **options):
    """A critic by name: heuristic, openai (base_url, model, ...), transformers (path, ...)."""
    if name == "heuristic":
        return HeuristicCritic(**{k: v for k, v in options.items() if k in ("max_suggestions",)})
    if name == "openai":
        return OpenAICritic(**options)
    if name == "transformers":
        path = options.pop("path", None) or options.pop("model", None)
        if not path:
            raise UsageError("the transformers critic needs --critic-model (a local folder or model id)")
        options.pop("base_url", None)
        return TransformersCritic.from_pretrained(path, **options)
    raise UsageError(f"unknown critic {name!r}; choose one of: {', '.join(CRITICS)}")
