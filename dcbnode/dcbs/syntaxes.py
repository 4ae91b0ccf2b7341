"""Transfer syntaxes DCBS understands, and how each one is stored.

Compressed syntaxes fall in two classes: *lossy* ones, whose codestreams are kept byte for byte
(re-encoding lossy data would lose more), and *lossless* ones, which are decoded and re-encoded as HTJ2K
lossless after a bit-exact check.  HTJ2K Lossless input is already in the stored form and is kept as is.
"""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

#: dcbnode's ImplementationClassUID and ImplementationVersionName (PS3.7 D.3.3.2), fixed so that
#: rebuilt files are byte-for-byte deterministic.
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.10.1443.1.0")
IMPLEMENTATION_VERSION_NAME = "DCBNODE_010"

#: Lossy-capable compressed syntaxes: their codestreams are stored and served as they arrived.
LOSSY_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless, HTJ2K})

#: Lossless compressed syntaxes that are decoded and stored as verified HTJ2K lossless.
TRANSCODED_LOSSLESS_SYNTAXES = frozenset({JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless,
                                          RLELossless})

#: HTJ2K lossless syntaxes, whose codestreams are already in the stored form.
HTJ2K_LOSSLESS_SYNTAXES = frozenset({HTJ2KLossless, HTJ2KLosslessRPCL})

#: Every transfer syntax a DCBS volume can take in, in the order a storage SCP should prefer them.
STORABLE_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
)


def is_lossy_syntax(uid: str) -> bool:
    """Return True for syntaxes whose pixel data is kept as the original codestream."""
    return uid in LOSSY_SYNTAXES


def is_storable_syntax(uid: str) -> bool:
    """Return True when a DCBS volume can store datasets encoded in ``uid``."""
    return uid in STORABLE_SYNTAXES
