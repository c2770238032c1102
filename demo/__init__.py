"""The full-stack demo: an application on top of the library (not shipped in the wheel)."""
