"""A real nginx (Debian's nginx-light) serving an OTA channel folder on a free loopback port.

It can be slowed down (``limit_rate``), so a test can cut a download in the middle by stopping
the server, and started again on the same port, so the client can resume with a Range request.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.brokers import free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

CONFIG = """
daemon off;
worker_processes 1;
pid {home}/nginx.pid;
error_log {home}/error.log info;
{user}
worker_rlimit_nofile {files};
events {{ worker_connections {connections}; }}
http {{
    log_format timed '$msec $status $body_bytes_sent "$request"';
    access_log {home}/access.log;
    access_log {home}/timed.log timed;
    client_body_temp_path {home}/tmp/body;
    proxy_temp_path {home}/tmp/proxy;
    fastcgi_temp_path {home}/tmp/fastcgi;
    uwsgi_temp_path {home}/tmp/uwsgi;
    scgi_temp_path {home}/tmp/scgi;
    default_type application/octet-stream;
    sendfile off;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ limit_rate {rate}; }}
    }}
}}
"""


class Nginx:
    def __init__(self, home: Path, root: Path, rate: str = "0", connections: int = 64) -> None:
        if not Path(NGINX).exists():
            raise RuntimeError(
                "nginx is not installed: the OTA tests serve the channel with Debian's "
                "nginx-light (scripts/setup.sh installs it)"
            )
        self.home, self.root, self.rate = home, root, rate
        self.connections = connections  # a simulated fleet keeps one keep-alive per device
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        (home / "tmp").mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        config = self.home / "nginx.conf"
        # as root, workers would drop to 'nobody' and could not read pytest's private tmp dirs
        user = "user root;" if os.geteuid() == 0 else ""
        config.write_text(
            CONFIG.format(
                home=self.home,
                root=self.root,
                port=self.port,
                rate=self.rate,
                user=user,
                connections=self.connections,
                files=2 * self.connections + 64,
            )
        )
        return config

    def start(self) -> Nginx:
        config = self._write_config()
        self.process = subprocess.Popen(
            [NGINX, "-p", str(self.home), "-c", str(config), "-e", str(self.home / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.log()}")
            try:
                urllib.request.urlopen(f"{self.url}/metadata/root.json", timeout=1).close()
                return self
            except OSError as exc:
                if getattr(exc, "code", None) == 404:
                    return self  # up, the channel just has no root.json yet
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not come up on {self.url}: {self.log()}")

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, like a server that went away."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        path = self.home / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def requests(self) -> list[tuple[float, int, int, str]]:
        """Every request so far as (time, status, body bytes, path), from the timed log."""
        rows = []
        log = self.home / "timed.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            head, _, request = line.partition(' "')
            when, status, sent = head.split()
            path = request.split(" ")[1] if " " in request else request
            rows.append((float(when), int(status), int(sent), path))
        return rows

    def bytes_sent(self, suffix: str) -> int:
        """Body bytes nginx sent for request paths ending with ``suffix`` (from access.log)."""
        total = 0
        log = self.home / "access.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            parts = line.split('"')
            if len(parts) > 2 and parts[1].split(" ")[1].endswith(suffix):
                total += int(parts[2].split()[1])
        return total
