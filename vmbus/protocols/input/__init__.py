"""Input (synthetic keyboard, HID mouse): wire formats and sans-I/O state machines."""
