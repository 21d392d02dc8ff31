"""Image grids with captions: the per-epoch sample sheet and the before/after comparison."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTION_PX = 14


def grid(images: list[np.ndarray], captions: list[str], columns: int) -> Image.Image:
    """uint8 HWC images (all one size) in rows of ``columns``, each with a one-line caption under it."""
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * w, rows * (h + CAPTION_PX)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * w, (i // columns) * (h + CAPTION_PX)
        sheet.paste(Image.fromarray(image), (x, y))
        draw.text((x + 2, y + h + 1), _fit(draw, caption, font, w - 4), fill="black", font=font)
    return sheet


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, or its longest prefix plus an ellipsis, that fits in ``width`` pixels ("" if not even the
    ellipsis does: on an image a few pixels wide)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:  # shrinks every pass, so it ends
        text = text[:-1]
    return text + "…" if draw.textlength(text + "…", font=font) <= width else ""
