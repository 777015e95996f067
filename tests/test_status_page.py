"""The live status page in a real headless browser (Debian's chromium and chromium-driver, driven
through selenium): a real pull's bar is there and advances, a hostile domain name stays text, and
the page with its data follows the exporter's TLS and basic auth.

Screenshots go to $LBJE_ARTIFACTS, or tests/artifacts/ (ignored by git); the path is printed.
Skipped without the browser unless LBJE_REQUIRE_TOOLS is set (scripts/test.sh sets it and
installs the browser with ``scripts/setup-host.sh --with-browser``).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

import vmlib
from certlib import make_cert

MiB = 1024 * 1024
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# libvirt refuses only '/' in a name: this one is valid, and an <img> whose error handler sets a
# flag if any part of the page ever parses a name as HTML.
HOSTILE = "<img src=x onerror=window.__xss=1>"
USER, PASSWORD = "prometheus", "s3cret pass"

pytestmark = pytest.mark.timeout(300)


def artifacts_dir() -> Path:
    path = Path(os.environ.get("LBJE_ARTIFACTS") or Path(__file__).resolve().parent / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not found]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        message = f"missing {', '.join(missing)} (scripts/setup-host.sh --with-browser)"
        if os.environ.get("LBJE_REQUIRE_TOOLS"):
            pytest.fail(f"LBJE_REQUIRE_TOOLS is set but {message}", pytrace=False)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Root in a container: no sandbox; loopback only, never through a proxy.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--no-proxy-server",
                "--window-size=1400,1000", "--disable-gpu"):
        options.add_argument(arg)
    options.accept_insecure_certs = True  # the TLS test's self-signed certificate
    # With both paths given selenium never runs Selenium Manager, which would download a browser.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


# What each table of the page shows, read from the DOM as text.
READ_TABLE = """
return Array.from(document.querySelectorAll('#' + arguments[0] + ' tr')).map(tr => ({
  cells: Array.from(tr.cells).map(td => td.textContent),
  progress: tr.querySelector('progress') ? tr.querySelector('progress').value : null,
  children: Array.from(tr.cells).map(td => td.children.length),
}));
"""


def table(driver, body_id: str) -> list[dict]:
    return driver.execute_script(READ_TABLE, body_id)


def row_of(driver, body_id: str, column: int, name: str) -> dict | None:
    return next((r for r in table(driver, body_id) if len(r["cells"]) > column and r["cells"][column] == name), None)


def screenshot(driver, capsys, name: str) -> Path:
    """Save a screenshot and print its path past pytest's capture, so every run shows it."""
    path = artifacts_dir() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.png"
    driver.save_screenshot(str(path))
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


@pytest.mark.libvirt
def test_live_pull_bar_advances_and_hostile_name_stays_text(vm_factory, exporter, browser, capsys):
    # 40 MiB in a depth-3 chain at 2 MiB/s: a pull of about 20 s, whatever else runs on the host.
    vm = vm_factory.create("status", depth=3, data_mib=40, size_mib=64, paused=True, name_tail=HOSTILE)
    exp = exporter(connected=True)
    vmlib.start_pull(vm, bandwidth_bytes=2 * MiB)
    browser.get(exp.url + "/")

    first = vmlib.wait_for(lambda: row_of(browser, "jobs", 0, vm.name), 30, what=f"a job row for {vm.name!r}")
    assert first["cells"][1:3] == ["vda", "pull"]
    assert first["cells"][6] == "2.0 MiB/s"  # the bandwidth cap
    second = vmlib.wait_for(lambda: (r := row_of(browser, "jobs", 0, vm.name)) and r["progress"] > first["progress"]
                            and "MiB/s" in r["cells"][4] and r, 20, what="the bar to advance and a rate to show")
    assert 0 <= first["progress"] < second["progress"] < 100
    assert second["cells"][5] not in ("", "\u2014")  # an ETA
    # The chain section names the same domain, as text.
    assert row_of(browser, "chains", 0, vm.name)["cells"][2] == "3"
    screenshot(browser, capsys, "status-page-live-pull")

    # The name went into the DOM as text in every cell that holds it: no element was made of it,
    # no handler ran, and the serialized DOM escapes it.
    assert browser.execute_script("return typeof window.__xss") == "undefined"
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    assert HOSTILE not in browser.page_source and "&lt;img src=x onerror=window.__xss=1&gt;" in browser.page_source
    assert row_of(browser, "jobs", 0, vm.name)["children"][:3] == [0, 0, 0]  # domain, disk, type: text only

    vmlib.abort(vm)  # the outcome shows, with the same name, as text
    done = vmlib.wait_for(lambda: row_of(browser, "outcomes", 1, vm.name), 30, what="the canceled outcome")
    assert done["cells"][4] == "canceled" and done["cells"][0].endswith("ago")
    assert row_of(browser, "jobs", 0, vm.name) is None
    assert browser.execute_script("return typeof window.__xss") == "undefined"
    recent = json.loads(exp.raw("/status.json"))["outcomes"]["recent"]
    assert any(o["domain"] == vm.name and o["outcome"] == "canceled" for o in recent), recent


@pytest.fixture
def tls_auth_exporter(tmp_path, exporter):
    """An exporter behind TLS and basic auth, with the web config the README shows."""
    cert, key = make_cert(tmp_path, "server")
    config = tmp_path / "web.yml"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    config.write_text(textwrap.dedent(f"""\
        tls_server_config:
          cert_file: {cert}
          key_file: {key}
        basic_auth_users:
          {USER}: {hashed}
        """))
    return exporter(f"--web.config.file={config}", ca_file=cert, basic_auth=(USER, PASSWORD)), cert


def test_page_and_status_json_follow_tls_and_basic_auth(tls_auth_exporter, browser, capsys):
    exp, cert = tls_auth_exporter
    tls = ssl.create_default_context(cafile=str(cert))
    for path in ("/", "/status.json"):
        with pytest.raises(urllib.error.HTTPError) as denied:  # no credentials
            urllib.request.urlopen(exp.url + path, timeout=10, context=tls)
        assert denied.value.code == 401
        with pytest.raises(urllib.error.URLError):  # the certificate is checked
            urllib.request.urlopen(exp.url + path, timeout=10, context=ssl.create_default_context())
    assert json.loads(exp.raw("/status.json"))["connection"]["mode"] == "read-only"
    page = exp.raw("/")
    assert b'new URL("status.json"' in page

    # The browser logs in with the URL's credentials and the page's fetches carry them.
    host = exp.url.removeprefix("https://")
    browser.get(f"https://{USER}:{PASSWORD.replace(' ', '%20')}@{host}/")
    try:
        state = vmlib.wait_for(lambda: browser.execute_script(
            "const c = document.getElementById('conn').textContent; return c === 'loading' ? null : c;"),
            20, what="the page to load status.json")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; the page says: {browser.find_element('id', 'error').text!r}") from None
    assert state in ("connected", "not connected")
    assert browser.find_element("id", "error").text == ""
    assert vmlib.wait_for(lambda: browser.find_element("id", "updated").text.startswith("updated"), 10,
                          what="an update")
    screenshot(browser, capsys, "status-page-tls-auth")

