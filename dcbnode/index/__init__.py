"""The index: SQLAlchemy models of Patient / Study / Series / Instance, and C-FIND matching.

The index knows nothing about the network.  It can always be rebuilt from the volumes.
"""

from .database import Index
from .models import Base, Instance, Patient, Series, Study, VolumeRow

__all__ = ["Base", "Index", "Instance", "Patient", "Series", "Study", "VolumeRow"]
