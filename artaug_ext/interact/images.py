"""Image files of pair datasets and evals: PNG bytes to write, full decoding to read."""

from __future__ import annotations

import io

from PIL import Image

from ..errors import FileFormatError


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def load_image(path: str) -> Image.Image:
    """An RGB image, fully decoded (a truncated or corrupt file raises naming it)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise FileFormatError(path, f"not a readable image ({type(e).__name__}: {e})",
                              "restore it, or delete it and run `artaug interact` again on the same folder") from None
