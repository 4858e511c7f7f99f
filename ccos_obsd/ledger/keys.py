"""Ed25519 signing keys in the C2SP signed-note key formats.

A verifier key is ``<name>+<8 hex key id>+<base64(0x01 || public key)>``, with
key id ``SHA-256(name || 0x0A || 0x01 || public key)[:4]``. The private key file
holds the matching signer key ``PRIVATE+KEY+<name>+<key id>+<base64(0x01 || seed)>``
(the format of golang.org/x/mod/sumdb/note), readable by its owner only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NewType

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from ccos_obsd.errors import KeyFormatError, StartupError

KeyId = NewType("KeyId", str)
"""Eight lowercase hex digits."""

ALG_ED25519 = b"\x01"
_SIGNER_PREFIX = "PRIVATE+KEY+"


def check_key_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise KeyFormatError(f"key name {name!r} must be non-empty, without spaces or '+'")


def compute_key_id(name: str, public_key: bytes) -> KeyId:
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + ALG_ED25519 + public_key).digest()
    return KeyId(digest[:4].hex())


@dataclass(frozen=True)
class VerifierKey:
    """A public key with the name and key id that signed-note verifiers expect."""

    name: str
    key_id: KeyId
    public_key: bytes

    @classmethod
    def from_public_key(cls, name: str, public_key: bytes) -> VerifierKey:
        check_key_name(name)
        return cls(name, compute_key_id(name, public_key), public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> VerifierKey:
        """Parse ``name+hexid+base64key``; the key id must match the key."""
        name, sep, rest = vkey.strip().partition("+")
        key_hex, sep2, key_b64 = rest.partition("+")
        if not sep or not sep2:
            raise KeyFormatError("verifier key must be <name>+<key id>+<base64 key>")
        check_key_name(name)
        try:
            raw = base64.b64decode(key_b64, validate=True)
        except binascii.Error as exc:
            raise KeyFormatError("verifier key: bad base64") from exc
        if len(raw) != 33 or raw[:1] != ALG_ED25519:
            raise KeyFormatError("verifier key: not an Ed25519 key (0x01 || 32 bytes)")
        key = cls.from_public_key(name, raw[1:])
        if key.key_id != key_hex.lower() or len(key_hex) != 8:
            raise KeyFormatError("verifier key: key id does not match the key")
        return key

    @property
    def key_id_bytes(self) -> bytes:
        return bytes.fromhex(self.key_id)

    def vkey(self) -> str:
        encoded = base64.b64encode(ALG_ED25519 + self.public_key).decode("ascii")
        return f"{self.name}+{self.key_id}+{encoded}"

    @cached_property
    def _public(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.public_key)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self._public.verify(signature, message)
        except InvalidSignature:
            return False
        return True


class SigningKey:
    """The daemon's private key, with its verifier half."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.verifier = VerifierKey.from_public_key(name, public)
        self._private_key = private_key

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_skey(cls, skey: str) -> SigningKey:
        text = skey.strip()
        if not text.startswith(_SIGNER_PREFIX):
            raise KeyFormatError("signer key must start with PRIVATE+KEY+")
        name, _, rest = text[len(_SIGNER_PREFIX) :].partition("+")
        key_hex, _, key_b64 = rest.partition("+")
        try:
            raw = base64.b64decode(key_b64, validate=True)
        except binascii.Error as exc:
            raise KeyFormatError("signer key: bad base64") from exc
        if len(raw) != 33 or raw[:1] != ALG_ED25519:
            raise KeyFormatError("signer key: not an Ed25519 seed (0x01 || 32 bytes)")
        key = cls(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if key.verifier.key_id != key_hex.lower():
            raise KeyFormatError("signer key: key id does not match the key")
        return key

    @property
    def key_id(self) -> KeyId:
        return self.verifier.key_id

    def skey(self) -> str:
        seed = self._private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        encoded = base64.b64encode(ALG_ED25519 + seed).decode("ascii")
        return f"{_SIGNER_PREFIX}{self.verifier.name}+{self.key_id}+{encoded}"

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)


def load_or_create_signing_key(path: Path, name: str) -> tuple[SigningKey, bool]:
    """Load the key file, or create it (mode 0600) when absent.

    Returns the key and whether it was created. Refuses (``StartupError``) a key
    file that group or others can read or write, as ssh does.
    """
    key = SigningKey.generate(name)
    if create_private_file(path, (key.skey() + "\n").encode("ascii")):
        return key, True
    return _load_signing_key(path), False


def create_private_file(path: Path, data: bytes) -> bool:
    """Create ``path`` (mode 0600) holding ``data``, durably; False if it already exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(path.parent)
    return True


def check_private_file(path: Path) -> None:
    """Refuse (``StartupError``) a key file that is not a regular file, or that group or others can use."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise StartupError(f"key file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise StartupError(
            f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}: it must not be "
            f"accessible by group or others (chmod 600 {path})"
        )


def replace_signing_key(path: Path, key: SigningKey) -> None:
    """Atomically put ``key`` in the key file (mode 0600, fsynced, then renamed over it)."""
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(key.skey() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _load_signing_key(path: Path) -> SigningKey:
    check_private_file(path)
    try:
        return SigningKey.from_skey(path.read_text(encoding="ascii"))
    except (KeyFormatError, UnicodeDecodeError, ValueError) as exc:
        raise StartupError(f"key file {path} is unreadable: {exc}") from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
