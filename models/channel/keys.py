"""Signing keys of an OTA channel, and the channel's first signed metadata.

One Ed25519 key per TUF role. The three online keys (targets, snapshot, timestamp) live in the
keys folder the publisher uses; the root key signs only ``root.json`` and is written apart (by
default ``<keys>/offline/root.pem``) to be moved to offline storage: publishing never needs it,
and a stolen online key can be replaced by a new root without touching devices.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from models.errors import FactoryError

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
ROOT_EXPIRY_DAYS = 365


def _write_private(path: Path, signer: CryptoSigner) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(signer.private_bytes)


def load_signer(path: Path) -> CryptoSigner:
    """A signer from a PEM (PKCS#8) private key file written by ``init_keys``."""
    try:
        private = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise FactoryError(f"signing key not found: {path}") from None
    except (OSError, ValueError, TypeError) as exc:
        raise FactoryError(f"cannot read signing key {path}: {exc}") from None
    return CryptoSigner(private)


def key_path(keys_dir: Path, role: str) -> Path:
    return keys_dir / f"{role}.pem"


def init_keys(
    keys_dir: Path, channel_dir: Path, root_key: Path | None = None
) -> tuple[Path, Metadata[Root]]:
    """Make the four keys and the channel's signed ``1.root.json``.

    Returns the root key's path (to move offline) and the root metadata (to provision devices).

    Raises:
        FactoryError: keys or a channel already exist there (never overwritten).
    """
    root_key = root_key or keys_dir / "offline" / "root.pem"
    existing = [p for p in [root_key, *(key_path(keys_dir, r) for r in ONLINE_ROLES)] if p.exists()]
    if existing:
        raise FactoryError(f"keys already exist, refusing to overwrite: {existing[0]}")
    if (channel_dir / "metadata" / "root.json").exists():
        raise FactoryError(f"{channel_dir} already holds a channel (metadata/root.json)")
    signers = {role: CryptoSigner.generate_ed25519() for role in ("root", *ONLINE_ROLES)}
    root = Root(expires=datetime.now(timezone.utc) + timedelta(days=ROOT_EXPIRY_DAYS))
    for role, signer in signers.items():
        root.add_key(signer.public_key, role)
    metadata = Metadata(root)
    metadata.sign(signers["root"])
    for role in ONLINE_ROLES:
        _write_private(key_path(keys_dir, role), signers[role])
    _write_private(root_key, signers["root"])
    public = {role: s.public_key.to_dict() for role, s in signers.items()}
    (keys_dir / "public.json").write_text(json.dumps(public, indent=1))
    return root_key, metadata
