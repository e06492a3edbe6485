"""Real Mosquitto brokers on free loopback ports, with their own config, started by the tests."""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


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


def make_certificates(folder: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=edge-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("client", "edge-device")):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.crt",
            "-extfile",
            "san.ext",
        )
    return TlsFiles(
        folder / "ca.crt",
        folder / "server.crt",
        folder / "server.key",
        folder / "client.crt",
        folder / "client.key",
    )


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
            [MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.process.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> dict:
        return json.loads(self.payload)


class Subscriber:
    """A real MQTT client that records everything it receives."""

    def __init__(
        self,
        port: int,
        topics: list[str],
        client_id: str | None = None,
        clean: bool = True,
        tls: TlsFiles | None = None,
        protocol: int = paho.MQTTv5,
        auth: tuple[str, str] | None = None,
    ):
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        kwargs = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "protocol": protocol,
            "client_id": client_id or f"test-sub-{free_port()}",
        }
        if protocol != paho.MQTTv5:
            kwargs["clean_session"] = clean
        self.client = paho.Client(**kwargs)
        if auth:
            self.client.username_pw_set(*auth)
        if tls is not None:
            self.client.tls_set(
                ca_certs=str(tls.ca), certfile=str(tls.client_cert), keyfile=str(tls.client_key)
            )
        self._topics = topics
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.port = port
        self.clean = clean
        self.protocol = protocol

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if not reason.is_failure:
            for topic in self._topics:
                client.subscribe(topic, qos=1)

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append(
                Received(message.topic, message.payload, bool(message.retain), time.time())
            )
            self._cond.notify_all()

    def start(self) -> Subscriber:
        if self.protocol == paho.MQTTv5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self.clean else 3600
            self.client.connect("127.0.0.1", self.port, clean_start=self.clean, properties=props)
        else:
            self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscription not acknowledged"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(10)

    def on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "messages") -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if predicate(m)]
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    topics = sorted({m.topic for m in self.messages})
                    raise AssertionError(f"timed out waiting for {what}; got topics {topics}")
                self._cond.wait(remaining)

    def wait_topic(self, topic: str, timeout: float = 20.0, where=lambda m: True) -> Received:
        return self.wait_for(
            lambda m: m.topic == topic and where(m), timeout, f"a message on {topic}"
        )[0]
