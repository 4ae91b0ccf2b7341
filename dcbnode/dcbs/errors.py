"""Exceptions raised by the DCBS library.

Every error that concerns a file names the file, and every error that concerns a record names its byte
offset, so that an operator can find and inspect the damage.
"""

from __future__ import annotations


class DcbsError(Exception):
    """Base class of every error raised by :mod:`dcbnode.dcbs`."""


class DcbsFormatError(DcbsError):
    """A file is not a DCBS (or DiCube) volume, or its structure is invalid."""


class CorruptRecordError(DcbsFormatError):
    """A record failed its checksum or structural checks: its bytes are never served."""

    def __init__(self, path: object, offset: int, reason: str) -> None:
        self.path = str(path)
        self.offset = offset
        self.reason = reason
        super().__init__(f"{self.path}: corrupt record at offset {offset}: {reason}")


class InvalidDatasetError(DcbsError):
    """A DICOM input cannot be stored as it is (bad UIDs, missing attributes, short pixel data...).

    ``reason`` is a short sentence suitable for a DICOM Error Comment (at most 64 characters is not
    enforced here; the network layer truncates).
    """

    def __init__(self, reason: str, *, source: object = None) -> None:
        self.reason = reason
        self.source = None if source is None else str(source)
        super().__init__(reason if source is None else f"{source}: {reason}")

    @property
    def comment(self) -> str:
        """``reason`` for a person (a DICOM Error Comment), without a library's exception text.

        An error raised from another library's exception quotes it after the first ``": "`` of its
        reason (``raise InvalidDatasetError(f"cannot parse the dataset: {exc}") from exc``); that text
        names Python internals (``'Dataset' object has no attribute …``) and is for the log only.
        """
        cause = self.__cause__
        if cause is None or isinstance(cause, DcbsError):
            return self.reason
        return self.reason.split(": ", 1)[0]


class UnsupportedTransferSyntaxError(InvalidDatasetError):
    """The dataset is encoded in a transfer syntax that DCBS cannot store losslessly."""


class UndecodablePixelDataError(InvalidDatasetError):
    """Compressed pixel data could not be decoded, so its faithfulness cannot be verified."""
