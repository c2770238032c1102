"""vsc package."""
