"""Prometheus exporter and alerting sidecar for libvirt block jobs."""

__version__ = "0.1.0"
