"""Read disks and their backing chains from a live domain XML.

The live XML is the only safe source of the chain while a job runs: the calls that would report
it otherwise (BLOCK stats, ``virDomainGetBlockInfo``) send ``query-named-block-nodes``, which can
crash QEMU 7.2 right as a pull finishes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from .model import BackingImage, DiskInfo

_SKIPPED_DEVICES = ("cdrom", "floppy")


def _source_name(element: ET.Element) -> str:
    source = element.find("source")
    if source is None:
        return ""
    for attribute in ("file", "dev", "volume"):
        value = source.get(attribute)
        if value:
            return value
    name = source.get("name")  # network disks: protocol + name
    if name:
        protocol = source.get("protocol", "")
        return f"{protocol}:{name}" if protocol else name
    return ""


def _format_of(element: ET.Element) -> str:
    fmt = element.find("format")
    if fmt is not None:
        return fmt.get("type", "")
    driver = element.find("driver")
    return driver.get("type", "") if driver is not None else ""


def _backing_chain(disk: ET.Element) -> tuple[BackingImage, ...]:
    chain: list[BackingImage] = []
    node = disk.find("backingStore")
    # An empty <backingStore/> terminates the chain; an absent one means libvirt did not probe it.
    while node is not None and (node.get("type") or node.find("source") is not None):
        chain.append(BackingImage(path=_source_name(node), format=_format_of(node)))
        node = node.find("backingStore")
    return tuple(chain)


def parse_disks(domain_name: str, xml: str) -> list[DiskInfo]:
    """Disks of one domain that can carry a block job (cdroms and floppies are left out)."""
    root = ET.fromstring(xml)
    disks: list[DiskInfo] = []
    for disk in root.findall("./devices/disk"):
        if disk.get("device", "disk") in _SKIPPED_DEVICES:
            continue
        target = disk.find("target")
        if target is None or not target.get("dev"):
            continue
        disks.append(DiskInfo(domain=domain_name, disk=target.get("dev"), source=_source_name(disk),
                              format=_format_of(disk), backing_chain=_backing_chain(disk)))
    return disks
