"""vsp package."""
