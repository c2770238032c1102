"""Device wire formats and sans-I/O device logic (SCSI disk target, ...).

Modules here may import only the vmbus core, never a VSP or VSC.
"""

__all__: list[str] = []
