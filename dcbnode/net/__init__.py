"""The DICOM network services (pynetdicom handlers); the only package that imports pynetdicom."""
