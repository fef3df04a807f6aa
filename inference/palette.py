"""One colour per structure or finding, shared by every writer (SC overlay, SEG, ``dicomnode render``).

The colours are the Okabe-Ito palette (Okabe & Ito 2008, "Color Universal
Design"), distinguishable with the common forms of colour blindness. A name
(a code meaning such as "Femur" or "Osteopenia", case-insensitive) always maps
to the same colour: known structures and findings have a fixed entry in
:data:`NAMED`; any other name gets a palette colour chosen from a stable hash
of the name, so it is also the same in every object the node writes.
"""

from __future__ import annotations

import zlib

RGB = tuple[int, int, int]

ORANGE: RGB = (230, 159, 0)
SKY_BLUE: RGB = (86, 180, 233)
BLUISH_GREEN: RGB = (0, 158, 115)
YELLOW: RGB = (240, 228, 66)
BLUE: RGB = (0, 114, 178)
VERMILLION: RGB = (213, 94, 0)
REDDISH_PURPLE: RGB = (204, 121, 167)
GREY: RGB = (187, 187, 187)

#: The Okabe-Ito colours without black (invisible on the dark backing) in palette order.
OKABE_ITO: tuple[RGB, ...] = (ORANGE, SKY_BLUE, BLUISH_GREEN, YELLOW, BLUE, VERMILLION, REDDISH_PURPLE)

#: Fixed colours of the structures and findings the shipped tasks report (keys lower case).
NAMED: dict[str, RGB] = {
    # knee bones
    "femur": SKY_BLUE,
    "tibia": ORANGE,
    "fibula": REDDISH_PURPLE,
    "patella": BLUISH_GREEN,
    # fractures: one colour for every "suspected fracture" mark
    "fracture": YELLOW,
    "fracture of growth plate": YELLOW,
    # bone mineral density classes (spine)
    "normal": BLUISH_GREEN,
    "osteopenia": ORANGE,
    "osteoporosis": VERMILLION,
}

#: Colour of a statement that reports nothing suspicious, and of positive statements.
NEGATIVE_TEXT: RGB = (235, 235, 235)
POSITIVE_TEXT: RGB = YELLOW


def colour_for(name: str) -> RGB:
    """The display colour of a structure or finding called ``name`` (the same in every result object)."""
    key = " ".join(str(name).lower().split())
    if key in NAMED:
        return NAMED[key]
    return OKABE_ITO[zlib.crc32(key.encode("utf-8")) % len(OKABE_ITO)]

#: colour map of saliency heat maps: cividis reads the same to people with red-green colour-vision deficiency
#: (jet, the usual choice, does not); low values are also nearly transparent in the overlays (alpha follows the value)
HEATMAP_CMAP = "cividis"
