"""Real services on loopback for the demo, the tests and the benchmarks: a Mosquitto broker on a
free port, and a live camera (a motion-JPEG stream over TCP) that can be made to stall.

The demo tells its story against the same broker the integration tests start (one copy of how
to configure, start and stop it): its own config file, a free port on 127.0.0.1, optional users,
ACL and TLS, and a ``stop``/``start`` that keeps the port so clients can come back.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.contract import AgentError


class ServiceError(AgentError):
    """A local service could not be started: which one, and what it said."""


def mosquitto_binary() -> str | None:
    """The mosquitto executable (Debian installs it in /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


class Mosquitto:
    """One broker process; ``stop``/``start`` keep the port so clients can come back to it."""

    def __init__(
        self,
        folder: Path,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        tls: TlsFiles | None = None,
        persistence: bool = False,
        sys_interval_s: int = 10,
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        lines = [
            f"user {getpass.getuser()}",
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if users else 'true'}",
            f"log_dest file {folder / 'mosquitto.log'}",
            "log_type all",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {folder}/",
            "max_queued_messages 100000",
            f"sys_interval {sys_interval_s}",  # $SYS statistics (mosquitto's default: 10 s)
        ]
        if users:
            passwords = folder / "passwords"
            passwords.write_text("")
            for user, password in users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(passwords), user, password],
                    check=True,
                    capture_output=True,
                )
            lines.append(f"password_file {passwords}")
        if acl is not None:
            (folder / "acl").write_text(acl)
            lines.append(f"acl_file {folder / 'acl'}")
        if tls is not None:
            lines += [
                f"cafile {tls.ca}",
                f"certfile {tls.server_cert}",
                f"keyfile {tls.server_key}",
                "require_certificate true",
                "use_identity_as_username false",
            ]
        self.config = folder / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        self.process = subprocess.Popen(
            [mosquitto_binary() or "mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C meant for the caller is the caller's to handle
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceError(f"mosquitto exited: {self.process.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise ServiceError(f"mosquitto did not start listening on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


class MjpegCamera:
    """A live camera on loopback: a clip's frames as a motion-JPEG stream over TCP, paced at the
    clip's rate, that the agent reads as ``tcp://127.0.0.1:PORT`` through OpenCV's FFmpeg like an
    IP camera. ``stall`` keeps the connection open and sends nothing, as a hung camera does."""

    def __init__(self, video: Path, fps: float | None = None, quality: int = 85) -> None:
        import cv2

        capture = cv2.VideoCapture(str(video))
        if not capture.isOpened():
            raise ServiceError(f"cannot open the clip {video}")
        self.fps = fps or capture.get(cv2.CAP_PROP_FPS) or 12.0
        self.frames: list[bytes] = []
        while True:
            ok, image = capture.read()
            if not ok:
                break
            self.frames.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
                               .tobytes())  # fmt: skip
        capture.release()
        if not self.frames:
            raise ServiceError(f"the clip {video} has no frames")
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.uri = f"tcp://127.0.0.1:{self.port}"
        self.connections = 0
        self._resume_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="mjpeg-camera", daemon=True)

    def start(self) -> MjpegCamera:
        self._thread.start()
        return self

    def stall(self, seconds: float) -> None:
        """Send nothing for ``seconds`` on whatever connection is open (and any new one)."""
        self._resume_at = time.monotonic() + seconds

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        self._server.settimeout(0.2)
        index = 0
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:  # the timeout, or the server closed by stop()
                continue
            self.connections += 1
            with client:
                due = time.monotonic()
                while not self._stop.is_set():
                    if time.monotonic() < self._resume_at:
                        time.sleep(0.05)
                        continue
                    try:
                        client.sendall(self.frames[index % len(self.frames)])
                    except OSError:
                        break  # the reader went away: wait for its reconnect
                    index += 1
                    due += 1.0 / self.fps
                    time.sleep(max(0.0, due - time.monotonic()))
