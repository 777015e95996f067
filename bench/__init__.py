"""Benchmark of the exporter against the libvirt RPC floor and the Debian libvirt exporter.

Run with ``python -m bench`` (see bench/README.md). Not part of the pytest run: speed and memory
targets are met here, on the real libvirtd + QEMU, not in timed tests.
"""
