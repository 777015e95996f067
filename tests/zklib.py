"""A real ZooKeeper server (Debian's ``zookeeper`` package) for one test: its own port and data dir.

``scripts/setup-host.sh --with-prometheus`` installs it. Tests skip without it, or fail under
``LBJE_REQUIRE_TOOLS=1`` (CI). The server is a child process tracked by vmlib's cleanup, so it is
stopped even when a test fails, the run is interrupted or pytest is killed with SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import vmlib

ZK_JAR = Path("/usr/share/java/zookeeper.jar")
ZK_CONF = Path("/etc/zookeeper/conf")  # log4j.properties; the server's zoo.cfg is our own
JAVA = shutil.which("java")


def require_zookeeper() -> None:
    if ZK_JAR.is_file() and JAVA:
        return
    msg = "ZooKeeper missing (apt-get install zookeeperd, or scripts/setup-host.sh --with-prometheus)"
    if os.environ.get("LBJE_REQUIRE_TOOLS"):
        pytest.fail(f"LBJE_REQUIRE_TOOLS is set but {msg}", pytrace=False)
    pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ZooKeeper:
    """One standalone server on 127.0.0.1; ``stop()``/``start()`` keep its port and data (a restart).

    tickTime 500 ms lets clients use sessions from 1 s to 60 s, so tests can use short ones.
    """

    def __init__(self) -> None:
        require_zookeeper()
        self._owned = vmlib._Owned()
        self.dir = Path(tempfile.mkdtemp(prefix="lbje-zk-"))
        self._owned.add_path(self.dir)
        self.port = _free_port()
        self.hosts = f"127.0.0.1:{self.port}"
        (self.dir / "data").mkdir()
        self.cfg = self.dir / "zoo.cfg"
        self.cfg.write_text(f"tickTime=500\ndataDir={self.dir / 'data'}\nclientPort={self.port}\n"
                            "clientPortAddress=127.0.0.1\nadmin.enableServer=false\nminSessionTimeout=1000\n"
                            "maxSessionTimeout=60000\n4lw.commands.whitelist=ruok,srvr\n")
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "zookeeper.log"
        self.start()

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [JAVA, "-Xmx128m", f"-Dzookeeper.log.dir={self.dir}", "-Dzookeeper.root.logger=INFO,CONSOLE",
                 "-cp", f"{ZK_CONF}:{ZK_JAR}", "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(self.cfg)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._owned.add_proc(self.proc)
        deadline = time.monotonic() + timeout
        while not self.ok():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ZooKeeper not serving on {self.hosts} within {timeout}s")
            time.sleep(0.1)

    def ok(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"srvr")
                return b"Mode: standalone" in s.recv(4096)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            vmlib.stop_process(self.proc, 10)

    def close(self) -> list[str]:
        return self._owned.cleanup()

    def client(self, **kw):
        from kazoo.client import KazooClient

        c = KazooClient(hosts=self.hosts, timeout=kw.pop("timeout", 5.0), **kw)
        c.start(timeout=10)
        return c

