"""Brokers for the tests: the real Mosquitto the demo also uses (``demo.services``), TLS
certificates made at test time, and a subscriber that records what arrives."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent_demo.services import Mosquitto, TlsFiles, free_port

__all__ = ["Mosquitto", "Received", "Subscriber", "TlsFiles", "free_port", "make_certificates"]


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
            # unique: a port number can come back, and a second client with the same id makes
            # the broker drop the first (the two then take the session from each other)
            "client_id": client_id or f"test-sub-{uuid.uuid4().hex[:12]}",
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
