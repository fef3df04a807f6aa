"""Text layout for burned-in overlays: font sizes, word wrapping and non-overlapping label placement.

All rectangles are ``(x0, y0, x1, y1)`` in pixels with exclusive ``x1``/``y1``.
The writers draw every piece of text on a dark backing rectangle and keep the
rectangles they drew, so tests can check that text stays inside the image and
that labels do not overlap.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache

from PIL import ImageDraw, ImageFont

Rect = tuple[int, int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

MIN_FONT = 9
PAD = 2  # backing margin around text, pixels
BACKING = (0, 0, 0)


@lru_cache(maxsize=64)
def font(size: int) -> Font:
    """Pillow's scalable default font at ``size`` pixels (at least :data:`MIN_FONT`)."""
    return ImageFont.load_default(size=max(MIN_FONT, int(size)))


def line_height(f: Font) -> int:
    """Height of one line of text in ``f``, ascender to descender."""
    if isinstance(f, ImageFont.FreeTypeFont):
        ascent, descent = f.getmetrics()
        return int(ascent + descent)
    return int(f.getbbox("Ag")[3])


def text_width(f: Font, text: str) -> int:
    """Advance width of ``text`` in ``f``, rounded up."""
    return int(f.getlength(text) + 0.999)


def _split_word(word: str, f: Font, max_width: int) -> list[str]:
    pieces, current = [], ""
    for ch in word:
        if current and text_width(f, current + ch) > max_width:
            pieces.append(current)
            current = ""
        current += ch
    return pieces + [current] if current else pieces


def wrap(text: str, f: Font, max_width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines no wider than ``max_width`` (over-long words are split)."""
    max_width = max(1, int(max_width))
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        current = ""
        for word in paragraph.split():
            pieces = [word] if text_width(f, word) <= max_width else _split_word(word, f, max_width)
            for piece in pieces:
                trial = f"{current} {piece}" if current else piece
                if text_width(f, trial) <= max_width:
                    current = trial
                else:
                    if current:
                        lines.append(current)
                    current = piece
        if current:
            lines.append(current)
    return lines


def overlaps(a: Rect, b: Rect) -> bool:
    """True when two rectangles share at least one pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(r: Rect, width: int, height: int) -> bool:
    """True when ``r`` lies within a ``width`` x ``height`` image."""
    return 0 <= r[0] < r[2] <= width and 0 <= r[1] < r[3] <= height


def label_size(text: str, f: Font) -> tuple[int, int]:
    """Size of a one-line label with its backing."""
    return text_width(f, text) + 2 * PAD, line_height(f) + 2 * PAD


def _clamp(x: int, y: int, w: int, h: int, width: int, height: int) -> Rect:
    x = min(max(0, x), width - w)
    y = min(max(0, y), height - h)
    return x, y, x + w, y + h


def _candidates(anchor: Rect, w: int, h: int, width: int, height: int) -> Iterator[Rect]:
    """Positions next to the anchor box first, then a scan of the whole area nearest first."""
    ax0, ay0, ax1, ay1 = anchor
    near = [(ax0, ay0 - h), (ax0, ay1), (ax1 - w, ay0 - h), (ax1 - w, ay1), (ax1 + 1, ay0), (ax0 - w - 1, ay0),
            (ax1 + 1, ay1 - h), (ax0 - w - 1, ay1 - h), (ax0, ay0)]
    for x, y in near:
        yield _clamp(x, y, w, h, width, height)
    step_y, step_x = max(1, h // 2), max(1, w // 4)
    cx, cy = (ax0 + ax1) // 2, (ay0 + ay1) // 2
    spots = [(x, y) for y in range(0, max(1, height - h + 1), step_y) for x in range(0, max(1, width - w + 1), step_x)]
    spots.sort(key=lambda p: (p[0] + w / 2 - cx) ** 2 + (p[1] + h / 2 - cy) ** 2)
    for x, y in spots:
        yield _clamp(x, y, w, h, width, height)


def place_labels(labels: Sequence[tuple[str, Rect]], f: Font, width: int, height: int,
                 reserved: Sequence[Rect] = ()) -> list[Rect | None]:
    """Greedy placement of labels beside their anchor boxes inside a ``width`` x ``height`` area.

    Each label goes to the first candidate position (above, below, beside the
    box, then anywhere, nearest first) that overlaps neither an earlier label nor
    a ``reserved`` rectangle; positions that also keep clear of every anchor box
    (its own included, so the label does not hide the box's edge) are preferred. A label that does not fit anywhere (or is wider than
    the area) gets ``None``.
    """
    placed: list[Rect] = []
    out: list[Rect | None] = []
    anchors = [a for _, a in labels]
    for text, anchor in labels:
        w, h = label_size(text, f)
        if w > width or h > height:
            out.append(None)
            continue
        blocked = [*placed, *reserved]
        chosen = None
        fallback = None
        for cand in _candidates(anchor, w, h, width, height):
            if any(overlaps(cand, r) for r in blocked):
                continue
            if not any(overlaps(cand, a) for a in anchors):
                chosen = cand
                break
            fallback = fallback or cand
        chosen = chosen or fallback
        if chosen is not None:
            placed.append(chosen)
        out.append(chosen)
    return out


def draw_text_block(draw: ImageDraw.ImageDraw, lines: Sequence[str], f: Font, x: int, y: int,
                    fill: tuple[int, int, int], backing: bool = True) -> Rect:
    """Draw ``lines`` from (x, y) on a dark backing; return the backing rectangle."""
    lh = line_height(f)
    w = max((text_width(f, line) for line in lines), default=0) + 2 * PAD
    rect = (x, y, x + w, y + len(lines) * lh + 2 * PAD)
    if backing:
        draw.rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=BACKING)
    for i, line in enumerate(lines):
        draw.text((x + PAD, y + PAD + i * lh), line, fill=fill, font=f)
    return rect


def leader(label: Rect, anchor: Rect) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """A line from a label to its box when they do not touch (nearest points), else None."""
    lx = min(max((anchor[0] + anchor[2]) // 2, label[0]), label[2] - 1)
    ly = min(max((anchor[1] + anchor[3]) // 2, label[1]), label[3] - 1)
    ax = min(max(lx, anchor[0]), anchor[2] - 1)
    ay = min(max(ly, anchor[1]), anchor[3] - 1)
    if abs(ax - lx) <= 2 and abs(ay - ly) <= 2:
        return None
    return (lx, ly), (ax, ay)
