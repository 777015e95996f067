"""Space a pull needs, estimated from the image files alone.

``virDomainGetBlockInfo`` and the BLOCK stats group would give exact figures but send
``query-named-block-nodes``, which can crash QEMU 7.2 while a pull finishes (DEVELOPERS.md), so
this module never talks to libvirt: it stats the backing files and the overlay's filesystem.
"""

from __future__ import annotations

import os
import stat

from exporter.model import DiskInfo

from .decide import DiskSpace

_QCOW2_MAGIC = b"QFI\xfb"


def qcow2_virtual_size(path: str) -> int | None:
    """Guest-visible size from a qcow2 header (bytes 24..31), or None if not a qcow2 file."""
    try:
        with open(path, "rb") as f:
            header = f.read(32)
    except OSError:
        return None
    if len(header) < 32 or header[:4] != _QCOW2_MAGIC:
        return None
    return int.from_bytes(header[24:32], "big")


def estimate_space(disk: DiskInfo, base_path: str | None) -> DiskSpace | None:
    """An upper bound of the bytes a pull copies into the overlay, and the room it has.

    The bound sums the allocated blocks of the layers the pull reads (above ``keep_base``), capped
    at the overlay's virtual size. None (the policy defers, reason ``space``) unless every layer is
    a regular file we can stat: guessing low for a device or network source could fill the overlay's
    filesystem.
    """
    paths = [layer.path for layer in disk.backing_chain]
    if base_path is not None:
        if base_path not in paths:
            return None
        paths = paths[:paths.index(base_path)]  # the layers above the base
    if not disk.source or not all(paths):
        return None  # a network source or layer
    try:
        stats = [os.stat(p) for p in [*paths, disk.source]]
        vfs = os.statvfs(os.path.dirname(os.path.abspath(disk.source)))
    except OSError:
        return None
    if not all(stat.S_ISREG(st.st_mode) for st in stats):
        return None
    total = sum(st.st_blocks * 512 for st in stats[:-1])
    virtual = qcow2_virtual_size(disk.source)
    if virtual is not None:
        total = min(total, virtual)
    return DiskSpace(bytes_to_copy=total, free_bytes=vfs.f_bavail * vfs.f_frsize)
