"""Grounded suggestions out of whatever text a vision-language model returns.

One function, `parse_suggestions(text, image_size, coords="auto")`, reads every grounding
convention we target and returns normalised boxes:

- Qwen2-VL: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x0,y0),(x1,y1)<|box_end|>`
  on a 0-1000 grid, and the same with the special tokens stripped (`the sky(0,0),(999,380)`),
  which is what vLLM returns unless the request sets `skip_special_tokens: false`;
- GLM-V: `label <|begin_of_box|>[x0,y0,x1,y1]<|end_of_box|>` on a 0-1000 grid (GLM-4.5V/4.6V:
  `[[x0,y0,x1,y1]]`, several boxes `[[...],[...]]`);
- JSON (bare or inside ```json fences, one object or a list, or {"suggestions": [...]}):
  `bbox_2d` in absolute pixels of `image_size` (Qwen2.5-VL; pass coords="rel1000" for
  Qwen3-VL, and for Qwen2-VL answering in JSON) or `box` already normalised to [0, 1].

It never raises: on garbage (truncated or absurdly nested JSON included) it returns no
suggestions and a `reason`, because a critic's bad answer must not stop a long run.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

CATEGORIES = ("exposure", "lighting", "composition", "atmosphere", "detail", "other")
COORDS = ("auto", "abs", "rel1000", "norm")
MAX_TEXT = 200_000  # longer answers are cut: no VLM answer is legitimately this long

# Keywords that map a free-form category (or a prompt, when no category is given) to ours.
_CATEGORY_WORDS = {
    "exposure": ("exposure", "exposed", "brightness", "overexposed", "underexposed", "too dark", "too bright",
                 "blown", "clipped", "washed"),
    "lighting": ("lighting", "light", "shadow", "glow", "sunlight", "backlit", "lit", "contrast"),
    "composition": ("composition", "angle", "framing", "shooting", "layout", "position", "perspective", "crop"),
    "atmosphere": ("atmosphere", "mood", "colour", "color", "tone", "vivid", "saturation", "style", "haze", "fog"),
    "detail": ("detail", "texture", "sharp", "sharpness", "focus", "blur", "crisp", "clarity", "noise"),
}


@dataclass
class Suggestion:
    """One grounded improvement: `box` = normalised (x0, y0, x1, y1) in [0, 1], `prompt` = the
    improved content of that region (a local prompt for the regional blend)."""

    box: tuple[float, float, float, float]
    prompt: str
    category: str = "other"
    rationale: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["box"] = [round(float(v), 6) for v in self.box]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Suggestion:
        return cls(box=tuple(float(v) for v in d["box"]), prompt=d["prompt"], category=d.get("category", "other"),
                   rationale=d.get("rationale", ""))


@dataclass
class ParseResult:
    """What a critic found; `reason` is empty when everything parsed was kept, else why not."""

    suggestions: list[Suggestion] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict:
        return {"suggestions": [s.to_dict() for s in self.suggestions], "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> ParseResult:
        return cls([Suggestion.from_dict(s) for s in d.get("suggestions", [])], d.get("reason", ""))


def split_identities(suggestions: list[Suggestion], prompt: str) -> tuple[list[Suggestion], int]:
    """(the suggestions with a usable local prompt, how many had none): a local prompt equal to
    the global prompt (case and spacing aside) makes the regional blend an identity, the same
    prediction inside the box as outside, so such a suggestion changes nothing and is dropped."""
    same = " ".join((prompt or "").split()).casefold()
    usable = [s for s in suggestions if " ".join(s.prompt.split()).casefold() != same]
    return usable, len(suggestions) - len(usable)


def normalise_category(name: str | None, fallback_text: str = "") -> str:
    """Map a free-form category name (or, failing that, the prompt's words) onto CATEGORIES."""
    for text in (name or "", fallback_text or ""):
        low = str(text).strip().lower()
        if not low:
            continue
        if low in CATEGORIES:
            return low
        for cat, words in _CATEGORY_WORDS.items():
            if any(re.search(r"\b" + re.escape(w) + r"\b", low) for w in words):
                return cat
    return "other"


# ---------------------------------------------------------------------------- candidates

_NUM = r"(-?\d+(?:\.\d+)?)"
_QWEN2 = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>)?\s*<\|box_start\|>\s*\(\s*" + _NUM + r"\s*,\s*"
    + _NUM + r"\s*\)\s*,\s*\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)\s*<\|box_end\|>",
    re.S,
)
_STRIPPED = re.compile(r"\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)\s*,\s*\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)")
# GLM-V writes `[x0,y0,x1,y1]`, and GLM-4.5V/4.6V `[[x0,y0,x1,y1]]` or several `[[...],[...]]`.
_GLM = re.compile(r"<\|begin_of_box\|>(.*?)<\|end_of_box\|>", re.S)
_QUAD = re.compile(r"\[\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\]")
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|\Z)", re.S)
_LABEL_CAT = re.compile(r"^\s*\[?\s*(" + "|".join(CATEGORIES) + r")\s*\]?\s*[:\-\u2013|]\s*", re.I)


def _clean_label(text: str) -> tuple[str, str]:
    """(category or '', prompt) from the free text before a box: last line, no bullets or quotes."""
    lines = [ln for ln in re.split(r"[\n\r]+", text or "") if ln.strip()]
    label = lines[-1] if lines else ""
    label = re.sub(r"<\|[^|>]*\|>", " ", label)
    label = re.split(r"[.;!?](?:\s|$)", label.strip())[-1] if re.search(r"[.;!?]\s+\S", label) else label
    label = re.sub(r"^[\s,;:.]*(?:and\s+|then\s+)?", "", label)
    label = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", label)
    label = label.strip().strip("\"'`").strip()
    label = re.sub(r"[\s:;,\-\u2013=]+$", "", label).strip().strip("\"'`").strip()
    m = _LABEL_CAT.match(label)
    category = ""
    if m:
        category = m.group(1).lower()
        label = label[m.end():].strip()
    return category, label


def _text_boxes(text: str, pattern: re.Pattern, has_label_group: bool) -> list[dict]:
    """Candidates from inline boxes; a box's prompt is the text since the previous box."""
    out, prev_end = [], 0
    for m in pattern.finditer(text):
        nums = [g for g in m.groups()[1 if has_label_group else 0:]]
        raw_label = m.group("label") if has_label_group and m.group("label") is not None else text[prev_end:m.start()]
        category, prompt = _clean_label(raw_label)
        out.append({"coords": nums, "prompt": prompt, "category": category})
        prev_end = m.end()
    return out


def _glm_boxes(text: str) -> list[dict]:
    """Candidates from GLM-V box blocks; every box of a block gets the text before the block."""
    out, prev_end = [], 0
    for m in _GLM.finditer(text):
        category, prompt = _clean_label(text[prev_end:m.start()])
        out += [{"coords": list(q.groups()), "prompt": prompt, "category": category} for q in _QUAD.finditer(m.group(1))]
        prev_end = m.end()
    return out


def _json_values(text: str) -> tuple[list, str]:
    """Every JSON value we can decode from fenced blocks or the bare text; (values, error)."""
    blocks = [m.group(1) for m in _FENCE.finditer(text)] if "```" in text else []
    blocks = blocks or [text]
    values, error = [], ""
    decoder = json.JSONDecoder()
    for block in blocks:
        block = block.strip()
        try:
            values.append(json.loads(block))
            continue
        except (ValueError, RecursionError) as e:
            error = f"{type(e).__name__}: {str(e)[:80]}"
        starts = [i for i in (block.find("["), block.find("{")) if i >= 0]
        if not starts:
            continue
        try:
            value, _ = decoder.raw_decode(block, min(starts))
            values.append(value)
        except (ValueError, RecursionError) as e:
            error = f"{type(e).__name__}: {str(e)[:80]}"
    return values, error


_PROMPT_KEYS = ("prompt", "local_prompt", "description", "caption", "suggestion", "improvement", "label")
_CAT_KEYS = ("category", "type", "aspect", "kind")
_WHY_KEYS = ("rationale", "reason", "why", "problem", "issue")


def _json_candidates(value) -> list[dict]:
    """Candidates from a decoded JSON value: an object, a list, or {"suggestions": [...]}."""
    items = value
    if isinstance(value, dict):
        for key in ("suggestions", "regions", "results", "objects", "boxes"):
            if isinstance(value.get(key), list):
                items = value[key]
                break
        else:
            items = [value]
    if not isinstance(items, list):
        return []
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if "bbox_2d" in item or "bbox" in item:
            coords, kind = item.get("bbox_2d", item.get("bbox")), "bbox_2d"
        elif "box" in item:
            coords, kind = item["box"], "box"
        else:
            continue
        prompt = next((item[k] for k in _PROMPT_KEYS if isinstance(item.get(k), str) and item[k].strip()), "")
        category = next((item[k] for k in _CAT_KEYS if isinstance(item.get(k), str)), "")
        rationale = next((item[k] for k in _WHY_KEYS if isinstance(item.get(k), str)), "")
        out.append({"coords": coords, "prompt": prompt, "category": category, "rationale": rationale, "kind": kind})
    return out


# ---------------------------------------------------------------------------- normalising

def _to_box(coords, scale: tuple[float, float]) -> tuple[float, float, float, float] | None:
    """Normalised, clamped, ordered box, or None when it is malformed or empty."""
    if not isinstance(coords, (list, tuple)) or len(coords) != 4:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in coords)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    sx, sy = scale
    x0, x1 = sorted((min(max(x0 / sx, 0.0), 1.0), min(max(x1 / sx, 0.0), 1.0)))
    y0, y1 = sorted((min(max(y0 / sy, 0.0), 1.0), min(max(y1 / sy, 0.0), 1.0)))
    if x1 - x0 <= 0.0 or y1 - y0 <= 0.0:
        return None
    return (x0, y0, x1, y1)


def _scale_for(convention: str, image_size: tuple[int, int]) -> tuple[float, float]:
    if convention == "rel1000":
        return (1000.0, 1000.0)
    if convention == "norm":
        return (1.0, 1.0)
    w, h = image_size
    return (float(w), float(h))


def parse_suggestions(text, image_size: tuple[int, int], coords: str = "auto",
                      max_suggestions: int | None = None) -> ParseResult:
    """Suggestions found in `text`; `image_size` = (width, height) the coordinates refer to.

    coords: how to read `bbox_2d` numbers: "auto"/"abs" = absolute pixels of `image_size`
    (Qwen2.5-VL), "rel1000" = 0-1000 grid (Qwen2-VL and Qwen3-VL when they answer in JSON),
    "norm" = already in [0, 1]. Inline token boxes (Qwen2-VL, GLM-V) are always on the 0-1000
    grid and JSON `box` is always normalised.

    Never raises on the answer; an unknown `coords` is the caller's bug and raises ValueError
    (as a reason it would silently empty every critique of a run).
    """
    if coords not in COORDS:
        raise ValueError(f"coords={coords!r}: use one of {COORDS}")
    try:
        return _parse(text, image_size, coords, max_suggestions)
    except Exception as e:  # the parser must never take a run down
        return ParseResult([], f"parser error on this answer: {type(e).__name__}: {e}")


def _parse(text, image_size, coords, max_suggestions) -> ParseResult:
    if not isinstance(text, str):
        return ParseResult([], f"the answer is {type(text).__name__}, not text")
    if not text.strip():
        return ParseResult([], "the answer is empty")
    try:
        if isinstance(image_size, (str, bytes)) or len(image_size) != 2:
            raise ValueError
        w, h = (int(v) for v in image_size)
    except (TypeError, ValueError):
        return ParseResult([], f"image_size {image_size!r} is not (width, height)")
    if w <= 0 or h <= 0:
        return ParseResult([], f"image_size {image_size!r} is not positive")
    notes = []
    if len(text) > MAX_TEXT:
        text, notes = text[:MAX_TEXT], [f"answer cut to {MAX_TEXT} characters"]

    candidates, fmt, json_error = [], "", ""
    if "<|box_start|>" in text:
        candidates, fmt = _text_boxes(text, _QWEN2, True), "qwen2-vl"
    if not candidates and "<|begin_of_box|>" in text:
        candidates, fmt = _glm_boxes(text), "glm-v"
    if not candidates and ("{" in text or "[" in text):
        values, json_error = _json_values(text)
        for v in values:
            candidates.extend(_json_candidates(v))
        fmt = "json" if candidates else fmt
    if not candidates:
        candidates = _text_boxes(text, _STRIPPED, False)
        fmt = "qwen2-vl-stripped" if candidates else fmt
    if not candidates:
        why = "no grounded suggestion (box with a prompt) found in the answer"
        if json_error:
            why += f"; JSON did not parse ({json_error})"
        return ParseResult([], "; ".join(notes + [why]))

    kept, no_box, no_prompt = [], 0, 0
    for c in candidates:
        kind = c.get("kind", "")
        if kind == "bbox_2d":
            convention = "abs" if coords == "auto" else coords
        else:  # inline tokens are on 0-1000 and `box` is normalised, whatever the model
            convention = "norm" if kind == "box" else "rel1000"
        box = _to_box(c["coords"], _scale_for(convention, (w, h)))
        prompt = " ".join(str(c.get("prompt") or "").split())
        if not any(ch.isalpha() for ch in prompt):
            prompt = ""  # punctuation or numbers only: not a prompt
        if box is None:
            no_box += 1
            continue
        if not prompt:
            no_prompt += 1
            continue
        kept.append(Suggestion(box=box, prompt=prompt, category=normalise_category(c.get("category"), prompt),
                               rationale=" ".join(str(c.get("rationale") or "").split())))
    if no_box:
        notes.append(f"dropped {no_box} {fmt} suggestion(s) with a malformed or empty box")
    if no_prompt:
        notes.append(f"dropped {no_prompt} {fmt} suggestion(s) with an empty prompt")
    if max_suggestions is not None and len(kept) > max_suggestions:
        notes.append(f"kept the first {max_suggestions} of {len(kept)} suggestions")
        kept = kept[:max_suggestions]
    return ParseResult(kept, "; ".join(notes))
