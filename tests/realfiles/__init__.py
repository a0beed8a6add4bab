"""Tests on real DICOM files that others wrote and PyPI packages ship (see docs/privacy.md)."""
