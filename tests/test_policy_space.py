"""The file-based space estimator (never libvirt: GetBlockInfo can crash QEMU 7.2 mid-pull)."""

from __future__ import annotations

import os
import struct

from exporter.model import BackingImage, DiskInfo
from exporter.policy.space import estimate_space, qcow2_virtual_size

MiB = 1024**2


def layer(path, data_bytes: int, apparent: int = 64 * MiB):
    with open(path, "wb") as f:
        f.truncate(apparent)  # sparse: only what we write below is allocated
        f.write(b"\x5a" * data_bytes)
        f.flush()
        os.fsync(f.fileno())
    return str(path)


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def fake_qcow2(path, virtual_size: int):
    header = b"QFI\xfb" + struct.pack(">I", 3) + b"\0" * 16 + struct.pack(">Q", virtual_size)
    with open(path, "wb") as f:
        f.write(header + b"\0" * 480)
    return str(path)


def diskinfo(tmp_path, source, chain):
    return DiskInfo("dom", "vda", source, "qcow2", tuple(BackingImage(p, "qcow2") for p in chain))


def test_sums_allocation_of_every_backing_layer_and_reads_free_space(tmp_path):
    a = layer(tmp_path / "a.img", 1 * MiB)
    b = layer(tmp_path / "b.img", 2 * MiB)
    top = layer(tmp_path / "top.img", 0)
    est = estimate_space(diskinfo(tmp_path, top, (a, b)), None)
    assert est.bytes_to_copy == allocated(a) + allocated(b)
    assert est.bytes_to_copy < 64 * MiB  # allocation, not apparent size
    vfs = os.statvfs(tmp_path)
    assert abs(est.free_bytes - vfs.f_bavail * vfs.f_frsize) < 16 * MiB


def test_keep_base_counts_only_the_layers_above_the_base(tmp_path):
    s1 = layer(tmp_path / "s1.img", 1 * MiB)
    s2 = layer(tmp_path / "s2.img", 1 * MiB)
    base = layer(tmp_path / "base.img", 4 * MiB)
    top = layer(tmp_path / "top.img", 0)
    est = estimate_space(diskinfo(tmp_path, top, (s1, s2, base)), base)
    assert est.bytes_to_copy == allocated(s1) + allocated(s2)


def test_capped_at_the_overlays_virtual_size(tmp_path):
    a = layer(tmp_path / "a.img", 2 * MiB)
    top = fake_qcow2(tmp_path / "top.qcow2", 1 * MiB)
    assert qcow2_virtual_size(top) == 1 * MiB
    assert estimate_space(diskinfo(tmp_path, top, (a,)), None).bytes_to_copy == 1 * MiB


def test_unknowable_layers_give_none(tmp_path):
    top = layer(tmp_path / "top.img", 0)
    a = layer(tmp_path / "a.img", MiB)
    assert estimate_space(diskinfo(tmp_path, top, ("",)), None) is None  # network source
    assert estimate_space(diskinfo(tmp_path, top, (str(tmp_path / "gone"),)), None) is None
    assert estimate_space(diskinfo(tmp_path, top, ("/dev/null",)), None) is None  # not a regular file
    assert estimate_space(diskinfo(tmp_path, "", (a,)), None) is None
    assert estimate_space(diskinfo(tmp_path, top, (a,)), "/not/in/chain") is None
    assert qcow2_virtual_size(a) is None
