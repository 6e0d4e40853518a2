"""Side-by-side pictures of a pair: original with the suggestion boxes and prompts, enhanced."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

from .parse import Suggestion

BOX_COLOURS = [(255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (255, 120, 255), (255, 150, 40)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def pair_picture(original: Image.Image, enhanced: Image.Image, suggestions: list[Suggestion],
                 prompt: str = "") -> Image.Image:
    """[original + numbered boxes | enhanced] over a caption listing each box's prompt."""
    w, h = original.size
    enhanced = enhanced.resize((w, h)) if enhanced.size != (w, h) else enhanced
    size = max(10, min(16, w // 20))
    font = _font(size)
    chars = max(20, (2 * w) // max(1, int(size * 0.6)))
    lines = textwrap.wrap(f"prompt: {prompt}", chars) if prompt else []
    for i, s in enumerate(suggestions):
        lines += textwrap.wrap(f"[{i + 1}] {s.category}: {s.prompt}", chars)
    caption_h = (size + 4) * len(lines) + 8
    canvas = Image.new("RGB", (2 * w + 4, h + caption_h), (255, 255, 255))
    canvas.paste(original.convert("RGB"), (0, 0))
    canvas.paste(enhanced.convert("RGB"), (w + 4, 0))
    draw = ImageDraw.Draw(canvas)
    for i, s in enumerate(suggestions):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        x0, y0, x1, y1 = s.box
        rect = [x0 * w, y0 * h, max(x0 * w, x1 * w - 1), max(y0 * h, y1 * h - 1)]
        draw.rectangle(rect, outline=colour, width=max(1, w // 128))
        draw.text((rect[0] + 2, rect[1] + 1), str(i + 1), fill=colour, font=font)
    y = h + 4
    for line in lines:
        draw.text((4, y), line, fill=(0, 0, 0), font=font)
        y += size + 4
    return canvas
