"""An OTA channel made with the real publisher (keys, TUF metadata, index), for the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.channel.keys import init_keys
from models.channel.publish import Publication, create, open_repository, publish


@dataclass
class Channel:
    folder: Path
    keys: Path

    @property
    def root(self) -> Path:
        return self.folder / "metadata" / "1.root.json"

    def publish(self, model: Path, version: str, golden: dict, **options: Any) -> Publication:
        options.setdefault("name", "yolov8n-coco")
        options.setdefault("target", "cpu-x86_64")
        options.setdefault("gate", {"skipped": True, "why": "test"})
        return publish(self.folder, self.keys, model, version, golden, **options)

    def stored(self, target_path: str) -> Path:
        """The file on disk that serves ``target_path`` (hash-prefixed name)."""
        with open_repository(self.folder, self.keys) as repo:
            return repo.stored_path(target_path, repo.targets.signed.targets[target_path])


def new_channel(folder: Path) -> Channel:
    keys = folder / "keys"
    _, root = init_keys(keys, folder / "channel")
    create(folder / "channel", keys, root, "stable")
    return Channel(folder / "channel", keys)
