"""Self-signed certificates for the TLS tests, made with the openssl CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_cert(directory: Path, name: str, san: str = "IP:127.0.0.1,DNS:localhost") -> tuple[Path, Path]:
    """A self-signed EC certificate and its key."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName={san}"],
        check=True, capture_output=True)
    return cert, key
