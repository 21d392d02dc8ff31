"""Image grids with captions: the per-epoch sample sheet and the before/after comparison.

Tiny images are enlarged (nearest neighbour, an integer factor) to at least ``MIN_CELL_PX`` wide, and each
caption is wrapped over as many lines as it needs under its image: the whole prompt and reward stay
readable, never cut to "a tur…".
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_CELL_PX = 192
PAD_PX = 2


def grid(images: list[np.ndarray], captions: list[str], columns: int) -> Image.Image:
    """uint8 HWC images (all one size) in rows of ``columns``, each with its wrapped caption under it."""
    h, w = images[0].shape[:2]
    scale = max(1, -(-MIN_CELL_PX // w))
    cell_w, cell_h = w * scale, h * scale
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_px = measure.textbbox((0, 0), "Ag", font=font)[3] + 2
    wrapped = [wrap(measure, caption, font, cell_w - 2 * PAD_PX) for caption in captions]
    rows = [range(r, min(r + columns, len(images))) for r in range(0, len(images), columns)]
    text_h = [max(len(wrapped[i]) for i in row) * line_px + PAD_PX for row in rows]
    sheet = Image.new("RGB", (columns * cell_w, sum(cell_h + t for t in text_h)), "white")
    draw, y = ImageDraw.Draw(sheet), 0
    for row, row_text in zip(rows, text_h):
        for i in row:
            x = (i % columns) * cell_w
            sheet.paste(Image.fromarray(images[i]).resize((cell_w, cell_h), Image.NEAREST), (x, y))
            for k, line in enumerate(wrapped[i]):
                draw.text((x + PAD_PX, y + cell_h + 1 + k * line_px), line, fill="black", font=font)
        y += cell_h + row_text
    return sheet


def wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels: greedy by word, a word too long for a line split
    between characters (every line takes at least one character, so this always ends)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
            continue
        while word:
            cut = len(word)
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
    return lines or [""]
