"""Space a pull needs, estimated from the image files alone.

``virDomainGetBlockInfo`` and the BLOCK stats group would give exact figures but send
``query-named-block-nodes``, which can crash QEMU 7.2 while a pull finishes (DEVELOPERS.md), so
this module never talks to libvirt: it stats the backing files and the overlay's filesystem.
"""

from __future__ import annotations

import os
import stat
import struct

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
    return struct.unpack(">Q", header[24:32])[0]


def estimate_space(disk: DiskInfo, base_path: str | None) -> DiskSpace | None:
    """An upper bound of the bytes a pull copies into the overlay, and the room it has.

    The bound is the sum of the allocated blocks (``st_blocks * 512``) of every layer the pull
    reads (for ``keep_base`` only the layers above the base), capped at the overlay's virtual size.
    None (the policy then defers with reason ``space``) when any layer is not a regular file we
    can stat: a block device or network source gives no usable figure, and guessing low could
    fill the overlay's filesystem.
    """
    if not disk.source:
        return None
    chain = disk.backing_chain
    if base_path is not None:
        index = next((i for i, b in enumerate(chain) if b.path == base_path), None)
        if index is None:
            return None
        chain = chain[:index]
    try:
        total = 0
        for layer in chain:
            if not layer.path:
                return None
            st = os.stat(layer.path)
            if not stat.S_ISREG(st.st_mode):
                return None
            total += st.st_blocks * 512
        st = os.stat(disk.source)
        if not stat.S_ISREG(st.st_mode):
            return None
        vfs = os.statvfs(os.path.dirname(os.path.abspath(disk.source)))
    except OSError:
        return None
    virtual = qcow2_virtual_size(disk.source)
    if virtual is not None:
        total = min(total, virtual)
    return DiskSpace(bytes_to_copy=total, free_bytes=vfs.f_bavail * vfs.f_frsize)
