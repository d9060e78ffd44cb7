"""mgpumanager: one daemon in front of several AI inference servers sharing one GPU."""

__version__ = "0.1.0"
