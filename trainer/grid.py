"""Image grids with captions: the per-epoch sample sheet and the before/after comparison; for videos (uint8
(F, H, W, 3) cells, a video family's), a still sheet of frame strips and an animated GIF of the same grid beside it.

Tiny images are enlarged (nearest neighbour, an integer factor) to at least ``MIN_CELL_PX`` wide, and each
caption is wrapped over as many lines as it needs under its image: the whole prompt and reward stay
readable, never cut to "a tur…".
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_CELL_PX = 192
PAD_PX = 2
FRAME_MS = 125  # the animation's frame time: 8 frames a second (Wan's 81 frames play in about 10 s, theirs at 16 fps)


def save_sheet(cells: list[np.ndarray], captions: list[str], columns: int, path) -> Image.Image:
    """``grid`` of the cells saved at ``path`` (and returned). Videos: each cell its frames side by side (a frame
    strip) at ``path``, and the grid animated frame by frame at ``path`` with the suffix .gif (pillow)."""
    from pathlib import Path

    if cells[0].ndim == 3:  # images: the sheet as it always was
        picture = grid(cells, captions, columns)
        picture.save(path)
        return picture
    picture = grid([np.concatenate(list(video), axis=1) for video in cells], captions, columns)
    picture.save(path)
    frames = [grid([video[f] for video in cells], captions, columns) for f in range(len(cells[0]))]
    frames[0].save(Path(path).with_suffix(".gif"), save_all=True, append_images=frames[1:], duration=FRAME_MS, loop=0)
    return picture


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
