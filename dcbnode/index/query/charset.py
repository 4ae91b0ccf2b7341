"""The character set of a C-FIND response: the study's own when it can hold every value, else UTF-8.

PS3.5 6.1 lets a response declare any Specific Character Set that encodes its values.  dcbnode answers in
the set the study was stored with — single-byte (``ISO_IR 100``…), multi-byte (``GB18030``) and ISO 2022
code extensions alike (``\\ISO 2022 IR 87`` for Japanese, ``\\ISO 2022 IR 149`` for Korean…) — so a peer
that handles the study's set gets the names as the modality wrote them; ASCII-only responses declare
none; a value the study's set cannot hold (e.g. a name in another script found through another study's
patient) makes the whole response ``ISO_IR 192`` (UTF-8).
"""

from __future__ import annotations

from functools import cache

from pydicom.charset import custom_encoders, python_encoding

__all__ = ["response_charset"]

#: Terms whose repertoire is ISO-IR 6 (ASCII) in DICOM, though pydicom decodes them as Latin-1.
_ASCII_TERMS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
_UTF8 = "ISO_IR 192"


@cache
def _encoders(stored: str) -> tuple[str, ...] | None:
    """The Python codecs of a stored Specific Character Set (``\\``-separated terms), ``"ascii"`` for the
    default repertoire; None when a term is unknown to pydicom."""
    codecs = []
    for term in stored.split("\\"):
        term = term.strip()
        codec = "ascii" if term in _ASCII_TERMS else python_encoding.get(term)
        if codec is None:
            return None
        codecs.append(codec)
    return tuple(codecs)


def _encodes(character: str, codec: str) -> bool:
    try:
        if codec in custom_encoders:  # pydicom's own encoders (JIS X 0201, JIS X 0208, JIS X 0212)
            custom_encoders[codec](character, errors="strict")
        else:
            character.encode(codec)
    except (UnicodeError, LookupError):
        return False
    return True


def response_charset(texts: list[str], stored: str) -> str | list[str]:
    """The Specific Character Set to declare for a response holding ``texts``, the study's set being
    ``stored`` (as indexed: terms joined by backslashes): "" for ASCII, ``stored`` (a list when it has
    several terms) when every character can be encoded in one of its terms, else ``ISO_IR 192``.

    Per character, because pydicom encodes a value of an ISO 2022 set in runs, switching terms with escape
    sequences wherever a character needs another one.
    """
    if all(text.isascii() for text in texts):
        return ""
    codecs = _encoders(stored) if stored and stored != _UTF8 else None
    if codecs is None:
        return _UTF8
    characters = {character for text in texts for character in text if not character.isascii()}
    if not all(any(_encodes(character, codec) for codec in codecs) for character in characters):
        return _UTF8
    terms = [term.strip() for term in stored.split("\\")]
    return terms if len(terms) > 1 else terms[0]
