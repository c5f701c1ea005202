"""Data layer: DICOM I/O, phantoms, built-in dataset and the input pipeline (uses physics, never models)."""
