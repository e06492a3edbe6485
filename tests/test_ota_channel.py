"""The device's channel client against a real nginx: trust, tampering and resumed downloads."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.config import OtaConfig
from agent.contract.descriptor import INDEX_TARGET
from agent.updates.ota import ChannelClient, OtaError
from agent.vision.backends.base import file_digest
from models.channel.publish import open_repository
from tests.channel_server import Nginx

NAME, TARGET = "yolov8n-coco", "cpu-x86_64"


@pytest.fixture
def published(channel, dynamic_model, golden_set):
    channel.publish(dynamic_model, "1.1.0", golden_set)
    return channel


@pytest.fixture
def nginx(tmp_path, published):
    server = Nginx(tmp_path / "nginx", published.folder).start()
    yield server
    server.stop()


def client_for(url: str, channel, state: Path, **options) -> ChannelClient:
    config = OtaConfig(enabled=True, channel=url, root=channel.root, retry_backoff_s=0.2, **options)
    return ChannelClient(config, state / "tuf", "dev1")


def test_device_finds_and_downloads_the_signed_model(nginx, published, dynamic_model, tmp_path):
    client = client_for(nginx.url, published, tmp_path)
    offer = client.find(NAME, TARGET, active_version=None)
    assert offer is not None and offer.version == "1.1.0" and offer.target == TARGET
    assert offer.descriptor.class_names[0] == "person"
    path = client.download(offer, tmp_path / "model.part")
    assert file_digest(path) == file_digest(dynamic_model)
    assert client.find(NAME, TARGET, active_version="1.1.0") is None  # nothing newer


def test_a_local_folder_channel_works_without_a_server(published, tmp_path):
    client = client_for(published.folder.as_uri(), published, tmp_path)
    assert client.find(NAME, TARGET, None).version == "1.1.0"


def test_download_cut_in_the_middle_resumes_with_a_range_request(
    published, dynamic_model, tmp_path
):
    server = Nginx(tmp_path / "slow", published.folder, rate="1m").start()  # 3.5 MB: ~3.5 s
    try:
        client = client_for(server.url, published, tmp_path)
        offer = client.find(NAME, TARGET, None)
        length = offer.model_target.length
        partial = tmp_path / "model.part"
        outcome: dict = {}

        def download() -> None:
            try:
                outcome["path"] = client.download(offer, partial)
            except Exception as exc:  # reported below
                outcome["error"] = exc

        worker = threading.Thread(target=download)
        worker.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
            not partial.exists() or partial.stat().st_size < length * 0.35
        ):
            time.sleep(0.05)
        cut_at = partial.stat().st_size
        server.stop()  # the connection drops mid-body
        time.sleep(1.0)
        server.start()  # same port
        worker.join(timeout=60)
        assert "error" not in outcome, outcome.get("error")
        assert file_digest(outcome["path"]) == file_digest(dynamic_model)
        assert 0 < cut_at < length
        assert client.fetcher.resumes >= 1
        model_bytes = server.bytes_sent("model.onnx")
        assert model_bytes < 1.5 * length, (model_bytes, length)
        assert client.fetcher.bytes_received < 1.5 * length + 200_000  # + metadata
    finally:
        server.stop()


def test_a_restart_resumes_from_the_partial_file_on_disk(nginx, published, tmp_path):
    client = client_for(nginx.url, published, tmp_path)
    offer = client.find(NAME, TARGET, None)
    length = offer.model_target.length
    partial = tmp_path / "model.part"
    source = published.stored(offer.descriptor.file.path)
    partial.write_bytes(source.read_bytes()[: length // 2])  # what a killed agent left
    client.download(offer, partial)
    assert file_digest(partial) == file_digest(source)
    assert nginx.bytes_sent("model.onnx") == length - length // 2


def _expect(kind: str, action) -> OtaError:
    with pytest.raises(OtaError) as caught:
        action()
    assert caught.value.kind == kind, f"{caught.value.kind}: {caught.value}"
    return caught.value


def test_a_corrupted_model_file_is_refused_and_not_kept(nginx, published, tmp_path):
    client = client_for(nginx.url, published, tmp_path)
    offer = client.find(NAME, TARGET, None)
    stored = published.stored(offer.descriptor.file.path)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    partial = tmp_path / "model.part"
    error = _expect("corrupt", lambda: client.download(offer, partial))
    assert "hash" in str(error)
    assert not partial.exists()  # never resumed from bytes that do not verify


def test_a_model_file_of_the_wrong_size_is_refused(nginx, published, tmp_path):
    client = client_for(nginx.url, published, tmp_path)
    offer = client.find(NAME, TARGET, None)
    stored = published.stored(offer.descriptor.file.path)
    stored.write_bytes(stored.read_bytes() + b"\0" * 4096)
    error = _expect("wrong_size", lambda: client.download(offer, tmp_path / "model.part"))
    assert "longer than its signed length" in str(error)


def test_metadata_with_a_bad_signature_is_refused(nginx, published, tmp_path):
    newest = max(
        (published.folder / "metadata").glob("*.targets.json"),
        key=lambda p: int(p.name.split(".")[0]),
    )
    document = json.loads(newest.read_text())
    model = next(k for k in document["signed"]["targets"] if k.endswith("model.onnx"))
    document["signed"]["targets"][model]["length"] += 1  # changed without the targets key
    newest.write_text(json.dumps(document))
    client = client_for(nginx.url, published, tmp_path)
    error = _expect("bad_signature", lambda: client.find(NAME, TARGET, None))
    assert "signature" in str(error)


def test_expired_metadata_is_refused(nginx, published, tmp_path):
    with open_repository(published.folder, published.keys) as repo:
        repo.commit(expires={"timestamp": datetime.now(timezone.utc) - timedelta(hours=1)})
    client = client_for(nginx.url, published, tmp_path)
    error = _expect("expired", lambda: client.find(NAME, TARGET, None))
    assert "expired" in str(error)


def test_replayed_older_metadata_is_refused(nginx, published, dynamic_model, golden_set, tmp_path):
    timestamp = published.folder / "metadata" / "timestamp.json"
    old = timestamp.read_bytes()
    published.publish(dynamic_model, "1.2.0", golden_set)
    client = client_for(nginx.url, published, tmp_path)
    assert client.find(NAME, TARGET, None).version == "1.2.0"  # the device trusts v(n+1)
    timestamp.write_bytes(old)  # an attacker (or a stale mirror) serves the older one
    _expect("replayed", lambda: client.find(NAME, TARGET, None))


def test_a_target_path_that_climbs_out_of_the_channel_is_refused(nginx, published, tmp_path):
    with open_repository(published.folder, published.keys) as repo:
        index = json.loads(repo.read_target(INDEX_TARGET))
        index["releases"][0]["variants"][TARGET]["descriptor"] = "../../../etc/passwd"
        repo.add_target(INDEX_TARGET, json.dumps(index).encode())  # properly signed, still bad
        repo.commit()
    client = client_for(nginx.url, published, tmp_path)
    error = _expect("unsafe_path", lambda: client.find(NAME, TARGET, None))
    assert "../../../etc/passwd" in str(error)


def test_a_model_larger_than_the_device_allows_is_refused_before_download(
    nginx, published, tmp_path
):
    client = client_for(nginx.url, published, tmp_path, max_model_bytes=1024 * 1024)
    error = _expect("oversized", lambda: client.find(NAME, TARGET, None))
    assert "max_model_bytes" in str(error)
    assert nginx.bytes_sent("model.onnx") == 0


def test_an_unreachable_channel_is_reported_as_such(published, tmp_path):
    client = client_for("http://127.0.0.1:9", published, tmp_path, retries=1)
    _expect("unreachable", lambda: client.find(NAME, TARGET, None))


def test_a_wrong_trust_root_is_a_config_error(nginx, published, tmp_path):
    bad_root = tmp_path / "root.json"
    bad_root.write_text("{}")
    config = OtaConfig(enabled=True, channel=nginx.url, root=bad_root)
    error = _expect(
        "config", lambda: ChannelClient(config, tmp_path / "t", "d").find(NAME, TARGET, None)
    )
    assert "not a TUF root" in str(error)
