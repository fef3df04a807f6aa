"""Body part synonyms: one table mapping what modalities write into BodyPartExamined to a canonical term.

Scanners and technologists write the body part in the local language or as an
abbreviation ("HANDGELENK", "MUÑECA", "L-SPINE"). Routes name canonical terms
(the DICOM PS3.16 Annex L "Body Part Examined" code strings where they exist);
:func:`canonical_body_part` maps both sides to the same term before comparing.
Comparison is case-insensitive and ignores accents, spaces, hyphens and
underscores.
"""

from __future__ import annotations

import unicodedata

__all__ = ["SYNONYMS", "canonical_body_part", "normalise_term"]

#: canonical term -> synonyms (any case; accents, spaces, "-" and "_" are ignored)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "WRIST": ("HANDGELENK", "MUNECA", "MUÑECA", "POIGNET", "POLSO", "PULSO", "CARPUS", "CARPAL", "POLS", "NADGARSTEK"),
    "HAND": ("MANO", "MAIN", "FINGER", "FINGERS", "DEDO", "DOIGT", "PHALANX", "THUMB", "DAUMEN", "MITTELHAND"),
    "FOREARM": ("UNTERARM", "ANTEBRAZO", "AVANT-BRAS", "AVANTBRAS", "AVAMBRACCIO", "ULNA", "ELLE"),
    "RADIUS": ("DISTAL RADIUS", "RADIO", "SPEICHE"),
    "ELBOW": ("ELLENBOGEN", "ELLBOGEN", "CODO", "COUDE", "GOMITO"),
    "HUMERUS": ("UPPER ARM", "OBERARM", "BRAZO"),
    "ARM": ("UPR EXTREMITY", "UPPER EXTREMITY", "OBERE EXTREMITAT"),
    "SHOULDER": ("SCHULTER", "HOMBRO", "EPAULE", "SPALLA"),
    "LSPINE": ("LWS", "L-SPINE", "L SPINE", "LUMBAR", "LUMBAR SPINE", "LENDENWIRBELSAULE", "COLUMNA LUMBAR",
               "RACHIS LOMBAIRE", "LUMBOSACRAL", "LS SPINE"),
    "TSPINE": ("BWS", "T-SPINE", "THORACIC SPINE", "BRUSTWIRBELSAULE", "COLUMNA DORSAL", "DORSAL SPINE"),
    "CSPINE": ("HWS", "C-SPINE", "CERVICAL SPINE", "HALSWIRBELSAULE", "COLUMNA CERVICAL"),
    "SPINE": ("WIRBELSAULE", "COLUMNA", "RACHIS", "COLONNA", "WHOLE SPINE", "VERTEBRA", "VERTEBRAE"),
    "KNEE": ("KNIE", "RODILLA", "GENOU", "GINOCCHIO", "KNEE JOINT", "KNIEGELENK"),
    "TIBIA": ("SCHIENBEIN", "DISTAL TIBIA", "TIBIA DISTAL"),
    "FIBULA": ("WADENBEIN", "PERONE"),
    "LEG": ("LOWER LEG", "UNTERSCHENKEL", "PIERNA", "JAMBE", "GAMBA", "LOWER EXTREMITY", "LWR EXTREMITY"),
    "FEMUR": ("OBERSCHENKEL", "THIGH", "MUSLO", "CUISSE"),
    "ANKLE": ("SPRUNGGELENK", "OSG", "TOBILLO", "CHEVILLE", "CAVIGLIA", "ANKLE JOINT"),
    "FOOT": ("FUSS", "FUß", "PIE", "PIED", "PIEDE"),
    "HIP": ("HUFTE", "CADERA", "HANCHE", "ANCA"),
    "PELVIS": ("BECKEN", "PELVIS", "BASSIN", "BACINO"),
    "ABDOMEN": ("BAUCH", "ABDOMEN", "ABDOMINAL", "ADDOME", "ABD"),
    "CHEST": ("THORAX", "TORAX", "LUNGE", "POUMON", "TORACE"),
    "SKULL": ("SCHADEL", "CRANEO", "CRANE", "CRANIO", "HEAD"),
    "EXTREMITY": ("EXTREMITAT", "EXTREMIDAD", "EXTREMITE", "ESTREMITA"),
}


def normalise_term(text: str) -> str:
    """Upper-case ``text``, strip accents and drop spaces, hyphens and underscores."""
    decomposed = unicodedata.normalize("NFKD", text.strip().upper())
    no_accents = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(c for c in no_accents if c not in " -_").replace("ß", "SS")


def _build_lookup() -> dict[str, str]:
    lookup: dict[str, str] = {}
    for canonical, synonyms in SYNONYMS.items():
        for term in (canonical, *synonyms):
            key = normalise_term(term)
            if key in lookup and lookup[key] != canonical:
                raise ValueError(f"body part synonym {term!r} maps to both {lookup[key]} and {canonical}")
            lookup[key] = canonical
    return lookup


_LOOKUP = _build_lookup()


def canonical_body_part(text: str | None) -> str | None:
    """Return the canonical body part for ``text`` (``None`` for missing/empty input).

    Unknown terms are returned normalised (upper case, no accents or separators),
    so that a route naming an unlisted term still matches the same spelling.
    """
    if text is None:
        return None
    key = normalise_term(str(text))
    if not key:
        return None
    return _LOOKUP.get(key, key)
