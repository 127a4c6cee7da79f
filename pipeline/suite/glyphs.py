"""Glyph classes rendered offline from the fonts matplotlib ships, and the table of look-alike classes.

Every class is one character, named by its lowercased Unicode name (``unicodedata.name``): ``"latin
capital letter a"``, ``"greek small letter omega"``, ``"digit three"``, ``"plus sign"``. Glyphs are drawn
dark on white, centred on the font's capital height (so small letters stay small and descenders hang
below), with a small random scale and offset so two renderings of one class in one font differ.

Font faces fall into three disjoint groups (:data:`TRAIN_FONTS` for the backbone's corpus and the clean
stage-1 corpus, :data:`DOWNSTREAM_FONTS` held out for the few-shot sets, :data:`EXTRA_FONTS` for the
style-matched stage-1 corpus only). A font is used for a character only when it really draws it
(:func:`has_glyph`): the rendering is compared with the font's rendering of unassigned code points, because
a cmap can claim a character it draws as something else. The Computer Modern (BaKoMa) fonts keep TeX's
OT1 layout, where several ASCII punctuation codes are other symbols (``<`` is an inverted exclamation mark,
``|`` an em dash), so they are used for letters and digits only (:data:`TEX_CHARS`); ``cmmi10``, ``cmsy10``
and ``cmex10`` map ASCII codes to math symbols and are not used at all; the ``Display`` DejaVu faces
contain no Latin letters and are not listed.

Sources and licences (the fonts are the files in ``matplotlib.get_data_path()/fonts/ttf``):

============================  =========================================  ====================================
source                        used for                                   licence
============================  =========================================  ====================================
DejaVu fonts (DejaVuSans*,    glyph classes (Latin, Greek, digits,       Bitstream Vera Fonts licence (+ DejaVu
DejaVuSerif*)                 symbols)                                   changes public domain);
                                                                         ``fonts/ttf/LICENSE_DEJAVU``
STIX fonts (STIXGeneral*)     glyph classes (Latin, Greek, digits,       SIL Open Font License 1.1;
                              symbols)                                   ``fonts/ttf/LICENSE_STIX``
Computer Modern, BaKoMa TTF   glyph classes (Latin letters, digits)      BaKoMa Fonts Licence (free to use and
(cmr10, cmb10, cmss10,                                                   redistribute unmodified); text in
cmtt10, cmti10)                                                          matplotlib's ``LICENSE`` /
                                                                         ``METADATA`` ("BaKoMa Fonts")
scikit-learn ``load_digits``  ``SuiteDigits`` and handwritten-digit      UCI ML hand-written digits (Alpaydin
                              captions                                   & Kaynak), CC BY 4.0
Fashion-MNIST (Debian         ``SuiteFashion`` and clothing captions     MIT (Zalando Research)
``dataset-fashion-mnist``)
============================  =========================================  ====================================
"""

from __future__ import annotations

import functools
import os
import random
import unicodedata

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LATIN_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LATIN_LOWER = "abcdefghijklmnopqrstuvwxyz"
GREEK_UPPER = "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ"
GREEK_LOWER = "αβγδεζηθικλμνξοπρσςτυφχψω"
DIGITS = "0123456789"
SYMBOLS = "+=?!#$%&@*<>/\\~|"
GLYPH_CHARS = LATIN_UPPER + LATIN_LOWER + GREEK_UPPER + GREEK_LOWER + DIGITS + SYMBOLS
"""Every glyph class, as characters."""
TEX_CHARS = frozenset(LATIN_UPPER + LATIN_LOWER + DIGITS)
"""Characters the Computer Modern (OT1 layout) fonts are used for."""

TRAIN_FONTS = ("DejaVuSans", "DejaVuSans-Oblique", "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSansMono",
               "STIXGeneral", "STIXGeneralItalic", "cmr10", "cmss10", "cmtt10")
"""Faces of the backbone's caption corpus and of the clean stage-1 corpus."""
DOWNSTREAM_FONTS = ("DejaVuSans-Bold", "DejaVuSerif-Italic", "DejaVuSansMono-Oblique", "STIXGeneralBol",
                    "cmb10", "cmti10")
"""Faces held out for the downstream few-shot sets (never in any caption corpus)."""
EXTRA_FONTS = ("DejaVuSans-BoldOblique", "DejaVuSerif-BoldItalic", "DejaVuSansMono-Bold",
               "DejaVuSansMono-BoldOblique", "STIXGeneralBolIta", "cmr10", "cmss10")
"""Faces of the style-matched stage-1 corpus besides :data:`TRAIN_FONTS`: bold and italic faces like the
held-out ones, but not the same files (``cmr10``/``cmss10`` repeated keep TeX shapes in the mix)."""
FONT_GROUPS = {"train": TRAIN_FONTS, "downstream": DOWNSTREAM_FONTS, "extra": EXTRA_FONTS}

# Visually identical (or nearly so at 32 px) classes. Two members of one group are never in one label
# set, and each group goes wholly to one side: downstream or stage 1. Written as characters; handwritten
# digits join the group of their printed digit (see confusable_groups).
CONFUSABLE_CHARS = (
    "AΑ", "BΒ", "EΕ", "HΗ", "ZΖz", "KΚkκ", "MΜ", "NΝ", "TΤ", "YΥ", "XΧxχ", "PΡpρ",
    "IlΙ1|", "iι", "OΟ0oοΘθ", "CcςϹ", "Ss", "Vvν", "Wwω", "Uuυ", "yγ", "aα", "nη",
    "Ψψ", "Φφ", "Ππ",
)
"""The confusable table: each string is one group of look-alike characters."""

HANDWRITTEN_PREFIX = "handwritten "
"""Concept names of the scikit-learn digits are ``"handwritten " + concept_name(digit)``."""


def concept_name(ch: str) -> str:
    """The class name of a glyph: its lowercased Unicode name (``"greek capital letter omega"``)."""
    return unicodedata.name(ch).lower()


def char_of(name: str) -> str:
    """Inverse of :func:`concept_name` (``KeyError`` for a name that is no character)."""
    return unicodedata.lookup(name)


def confusable_groups() -> list[frozenset[str]]:
    """The confusable table as groups of concept names; each printed digit's group also holds its
    handwritten twin (``"digit three"`` and ``"handwritten digit three"``)."""
    groups = []
    for g in CONFUSABLE_CHARS:
        names = {concept_name(c) for c in g}
        names |= {HANDWRITTEN_PREFIX + concept_name(c) for c in g if c in DIGITS}
        groups.append(frozenset(names))
    grouped = set().union(*groups)
    for d in DIGITS:  # digits without another look-alike still pair with their handwritten twin
        if concept_name(d) not in grouped:
            groups.append(frozenset({concept_name(d), HANDWRITTEN_PREFIX + concept_name(d)}))
    return groups


def group_of(name: str) -> frozenset[str]:
    """The confusable group holding concept ``name`` (a singleton when it has no look-alike)."""
    for g in confusable_groups():
        if name in g:
            return g
    return frozenset({name})


def font_dir() -> str:
    """matplotlib's bundled TrueType folder."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def font_path(face: str) -> str:
    """Path of a face name (``"DejaVuSans-Bold"`` -> ``.../DejaVuSans-Bold.ttf``)."""
    return os.path.join(font_dir(), face + ".ttf")


@functools.lru_cache(maxsize=256)
def _font(face: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(face), size)


def _probe(face: str, ch: str) -> np.ndarray:
    im = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(im).text((32, 32), ch, font=_font(face, 44), fill=0, anchor="mm")
    return np.asarray(im)


MISSING_PROBES = ("\ue000", "\u0378", "\uffff")
"""Unassigned / private code points: a font draws its "missing glyph" box (or nothing) for them."""


@functools.lru_cache(maxsize=8192)
def has_glyph(face: str, ch: str) -> bool:
    """Whether ``face`` really draws ``ch``: the rendering is not blank and differs from the font's
    rendering of every unassigned code point in :data:`MISSING_PROBES`; Computer Modern faces only
    for :data:`TEX_CHARS`."""
    if face.startswith("cm") and ch not in TEX_CHARS:
        return False
    a = _probe(face, ch)
    if a.min() > 200:
        return False
    return not any(np.array_equal(a, _probe(face, m)) for m in MISSING_PROBES)


def faces_for(ch: str, faces: tuple[str, ...]) -> tuple[str, ...]:
    """The faces of ``faces`` (order kept, duplicates dropped) that draw ``ch``."""
    return tuple(f for f in dict.fromkeys(faces) if has_glyph(f, ch))


def render_glyph(ch: str, face: str, size: int, rng: random.Random | None = None,
                 scale_jitter: float = 0.08, shift_jitter: float = 0.05) -> Image.Image:
    """``ch`` in ``face`` as a ``size`` x ``size`` RGB image, dark ink on white.

    The font size is 68% of ``size``; the glyph is centred horizontally on its own box and vertically
    on the font's capital height (``H``). With ``rng``, the font size is scaled by ``1 +- scale_jitter``
    and the glyph shifted by up to ``shift_jitter * size`` in x and y. Raises ``ValueError`` when the
    face lacks the glyph (:func:`has_glyph`).
    """
    if not has_glyph(face, ch):
        raise ValueError(f"font {face} has no glyph for {ch!r} ({concept_name(ch)})")
    s, dx, dy = 1.0, 0.0, 0.0
    if rng is not None:
        s = 1.0 + rng.uniform(-scale_jitter, scale_jitter)
        dx, dy = (rng.uniform(-shift_jitter, shift_jitter) * size for _ in range(2))
    font = _font(face, max(4, round(0.68 * size * s)))
    _, cap_top, _, _ = font.getbbox("H", anchor="ls")
    left, _, right, _ = font.getbbox(ch, anchor="ls")
    x = size / 2 - (left + right) / 2 + dx
    y = size / 2 - cap_top / 2 + dy  # baseline: capital height centred
    im = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(im).text((x, y), ch, font=font, fill=(0, 0, 0), anchor="ls")
    return im
