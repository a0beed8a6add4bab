"""deid-node: a DICOM de-identification node, batch CLI and Python API (Encord-compatible names)."""

__version__ = "0.1.0"
