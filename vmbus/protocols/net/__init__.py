"""Network (NVSP carrying RNDIS): wire formats and sans-I/O state machines."""
