"""Debian's Prometheus scrapes the exporter through TLS and basic auth, with the web config and the
scrape config the README shows (only paths, the password hash and the target filled in), during a
real pull: the target is up and the job's series arrive."""

from __future__ import annotations

import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
import yaml

import vmlib
from certlib import make_cert
from promlib import PrometheusServer, require_tools

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
PASSWORD = "correct horse battery"


def readme_yaml(key: str) -> dict:
    """The README's one YAML block with ``key`` at its top level."""
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)]
    found = [b for b in blocks if isinstance(b, dict) and key in b]
    assert len(found) == 1, f"README should show exactly one YAML block with {key}: found {len(found)}"
    return found[0]


def test_prometheus_scrapes_through_tls_and_basic_auth_with_the_readme_config(tmp_path, vm_factory, exporter):
    require_tools("prometheus")
    cert, key = make_cert(tmp_path, "exporter")  # its own CA: Prometheus trusts just this certificate

    web = readme_yaml("tls_server_config")
    assert set(web["tls_server_config"]) == {"cert_file", "key_file"}
    (user,) = web["basic_auth_users"]
    web["tls_server_config"].update(cert_file=str(cert), key_file=str(key))
    web["basic_auth_users"][user] = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    web_config = tmp_path / "web.yml"
    web_config.write_text(yaml.safe_dump(web))

    vm = vm_factory.create("tls", depth=2, data_mib=40, size_mib=64, paused=True)
    exp = exporter(f"--web.config.file={web_config}", ca_file=cert, basic_auth=(user, PASSWORD), connected=True)
    vmlib.start_pull(vm, bandwidth_bytes=2 * MiB)  # about 20 s

    (job,) = readme_yaml("scrape_configs")["scrape_configs"]
    assert job["scheme"] == "https" and job["basic_auth"]["username"] == user
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")  # Prometheus trims the trailing newline
    job["tls_config"]["ca_file"] = str(cert)
    job["basic_auth"]["password_file"] = str(password_file)
    job["static_configs"] = [{"targets": [exp.url.removeprefix("https://")]}]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"

    prom = PrometheusServer(tmp_path / "prometheus", scrape_configs=[job])
    try:
        prom.start()
        (target,) = prom.wait_for_target_up(timeout=30)
        assert target["scrapeUrl"].startswith("https://") and target["labels"]["job"] == "libvirt-blockjob"
        prom.wait_for_query("libvirt_blockjob_up == 1", timeout=15)
        series = prom.wait_for_query(f'libvirt_blockjob_progress_ratio{{domain="{vm.name}",disk="vda"}} > 0',
                                     timeout=30)
        assert series[0]["metric"]["job_type"] == "pull"
        assert prom.query_value(f'libvirt_blockjob_bandwidth_bytes_per_second{{domain="{vm.name}"}}') == 2 * MiB
    finally:
        prom.stop()
    # And the same exporter refuses a scrape without the password.
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(exp.url + "/metrics", timeout=10, context=ssl.create_default_context(cafile=str(cert)))
    assert denied.value.code == 401
    vmlib.abort(vm)
