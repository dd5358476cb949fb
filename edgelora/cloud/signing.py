"""Signed adapter manifests: Ed25519 over canonical JSON.

The service signs, for each adapter and format it serves, a manifest naming every file's sha256 and
size, the base fingerprint, rank, targets, provenance and a validity window. The device pins the
service's public key and refuses anything whose signature, hashes, dates or base do not check out,
before a byte is installed.

An envelope on the wire::

    {"manifest": {...}, "signature": "<base64 Ed25519 over canonical(manifest)>", "key_id": "<16 hex>"}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from edgelora._io import atomic_file
from edgelora.errors import EdgeloraError

SCHEMA = "edgelora.signed-adapter/1"
KEY_PREFIX = "ed25519:"


class SignatureError(EdgeloraError):
    """A signed manifest that is missing, malformed, tampered with, expired or from another key."""


def canonical(obj: Any) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _now() -> float:
    return time.time()


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_iso(s: str) -> float:
    import calendar

    return float(calendar.timegm(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ")))


# -- keys -------------------------------------------------------------------------------------

def _crypto():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def load_or_create_private_key(path: str | os.PathLike):
    """The service's signing key (PKCS8 PEM, mode 0600), created on first use."""
    serialization, ed25519 = _crypto()
    path = Path(path)
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as e:
            raise SignatureError(f"{path}: not a PEM private key ({e}); restore it from a backup or remove it to make a new one") from e
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise SignatureError(f"{path}: not an Ed25519 key; the adapter service signs with Ed25519 only")
        return key
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with atomic_file(path) as tmp:
        tmp.write_bytes(pem)
        os.chmod(tmp, 0o600)
    os.chmod(path, 0o600)
    return key


def public_key_text(private_key) -> str:
    """The public key as one line, ``ed25519:<base64 of the 32 raw bytes>``: what devices pin."""
    serialization, _ = _crypto()
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode()


def public_key_line(spec: str | os.PathLike) -> str:
    """The ``ed25519:<base64>`` line of `spec`: the line itself or a file holding it."""
    text = str(spec).strip()
    if not text.startswith(KEY_PREFIX):
        p = Path(text)
        if not p.exists():
            raise SignatureError(f"the service key must be 'ed25519:<base64>' or a file holding it; {text!r} is neither")
        text = p.read_text(encoding="utf-8").strip()
        if not text.startswith(KEY_PREFIX):
            raise SignatureError(f"{p}: does not hold an 'ed25519:<base64>' public key")
    return text


def load_public_key(spec: str | os.PathLike):
    """A pinned public key from its one-line text or a file holding that line."""
    _, ed25519 = _crypto()
    text = public_key_line(spec)
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as e:
        raise SignatureError(f"the pinned service key is not a valid Ed25519 public key ({e})") from e


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -- signing and checking --------------------------------------------------------------------

def sign(manifest: dict[str, Any], private_key, *, ttl_s: float, now: float | None = None) -> dict[str, Any]:
    """An envelope for `manifest`, valid from now for `ttl_s` seconds."""
    now = _now() if now is None else now
    body = {**manifest, "schema": SCHEMA, "issued": iso(now), "expires": iso(now + ttl_s)}
    return {"manifest": body, "signature": base64.b64encode(private_key.sign(canonical(body))).decode(),
            "key_id": key_id(private_key.public_key())}


def verify(envelope: Any, public_key, *, now: float | None = None) -> dict[str, Any]:
    """The manifest of `envelope` if it is signed by `public_key` and valid now; else SignatureError."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(envelope, dict) or not isinstance(envelope.get("manifest"), dict):
        raise SignatureError("the service sent no signed manifest; refusing an unsigned adapter")
    sig = envelope.get("signature")
    if not isinstance(sig, str) or not sig:
        raise SignatureError("the adapter's manifest is unsigned; refusing it")
    try:
        raw = base64.b64decode(sig, validate=True)
    except binascii.Error as e:
        raise SignatureError(f"the adapter's signature is not base64 ({e}); refusing it") from e
    manifest = envelope["manifest"]
    try:
        public_key.verify(raw, canonical(manifest))
    except (InvalidSignature, ValueError) as e:
        theirs, ours = envelope.get("key_id"), key_id(public_key)
        why = f"it was signed by key {theirs}, not the pinned key {ours}" if theirs and theirs != ours else \
            "the manifest or its signature was changed after signing"
        raise SignatureError(f"the adapter's signature does not verify ({why}); refusing it") from e
    if manifest.get("schema") != SCHEMA:
        raise SignatureError(f"the signed manifest has schema {manifest.get('schema')!r}, expected {SCHEMA}; update edgelora")
    now = _now() if now is None else now
    try:
        issued, expires = parse_iso(manifest["issued"]), parse_iso(manifest["expires"])
    except (KeyError, TypeError, ValueError) as e:
        raise SignatureError("the signed manifest has no valid issued/expires dates; refusing it") from e
    if now > expires:
        raise SignatureError(f"the adapter's signature expired at {manifest['expires']} (now {iso(now)}); refusing it: pull it again")
    if issued > now + 300:
        raise SignatureError(f"the adapter's signature is dated {manifest['issued']}, in the future (now {iso(now)}); refusing it: check the clock")
    return manifest
