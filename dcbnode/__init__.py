"""dcbnode: a DICOM network node that archives series losslessly in DCBS volumes."""

__version__ = "0.1.0"
