"""Ed25519 keys in the C2SP signed-note formats, and the private key file.

Verifier key: ``<name>+<8 hex key id>+<base64(0x01 || 32-byte public key)>`` with
key id ``SHA-256(name || 0x0A || 0x01 || public key)[:4]`` (DESIGN.md). The key file
must be readable by its owner only.
"""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from ccos_obsd.errors import KeyFormatError, StartupError
from ccos_obsd.ledger.keys import (
    SigningKey,
    VerifierKey,
    compute_key_id,
    load_or_create_signing_key,
)
from tests.vectors import vectors_dir

VECTORS = vectors_dir()

# A fixed key so the expected strings below are stable.
SEED = bytes(range(32))
PUBLIC = Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes_raw()

key_names = st.text(min_size=1, max_size=40).filter(lambda n: not any(c.isspace() or c == "+" for c in n))


def expected_key_id(name: str, public_key: bytes) -> str:
    return hashlib.sha256(name.encode("utf-8") + b"\x0a" + b"\x01" + public_key).digest()[:4].hex()


def vkey_text(name: str, key_id: str, payload: bytes) -> str:
    return f"{name}+{key_id}+{base64.b64encode(payload).decode('ascii')}"


# --- key id and verifier key format


def test_key_id_is_first_four_bytes_of_sha256_over_name_newline_alg_key() -> None:
    assert compute_key_id("example.org/log", PUBLIC) == expected_key_id("example.org/log", PUBLIC)


@given(key_names, st.binary(min_size=32, max_size=32))
def test_key_id_is_eight_lowercase_hex_digits(name: str, public_key: bytes) -> None:
    key_id = compute_key_id(name, public_key)
    assert key_id == expected_key_id(name, public_key)
    assert len(key_id) == 8
    assert key_id == key_id.lower()


def test_vkey_string_format() -> None:
    key = VerifierKey.from_public_key("host/ccos-obsd", PUBLIC)
    assert key.vkey() == vkey_text("host/ccos-obsd", expected_key_id("host/ccos-obsd", PUBLIC), b"\x01" + PUBLIC)
    assert key.key_id_bytes == bytes.fromhex(key.key_id)


@given(key_names, st.binary(min_size=32, max_size=32))
def test_vkey_round_trip(name: str, public_key: bytes) -> None:
    key = VerifierKey.from_public_key(name, public_key)
    parsed = VerifierKey.from_vkey(key.vkey())
    assert parsed == key
    assert (parsed.name, parsed.key_id, parsed.public_key) == (name, expected_key_id(name, public_key), public_key)


def _signed_note_example() -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """The vkey, the note text and its (name, signature blob) lines from the C2SP example."""
    text = (VECTORS / "signed-note" / "example.txt").read_text(encoding="utf-8")
    vkey = next(line.removeprefix("vkey:").strip() for line in text.splitlines() if line.startswith("vkey:"))
    note = text.split("-----\n")[1]
    body, _, signature_block = note.rpartition("\n\n")
    signatures = []
    for line in signature_block.splitlines():
        dash, name, blob = line.split(" ")
        assert dash == "\u2014"
        signatures.append((name, base64.b64decode(blob)))
    return vkey, (body + "\n").encode("utf-8"), signatures


def test_signed_note_example_vkey_parses_with_the_published_key_id() -> None:
    vkey, _, _ = _signed_note_example()
    key = VerifierKey.from_vkey(vkey)
    assert key.name == "example.com/foo"
    assert key.key_id == "530d903a" == vkey.split("+")[1]
    assert key.key_id == expected_key_id(key.name, key.public_key)
    assert key.vkey() == vkey


def test_signed_note_example_signature_verifies_under_the_parsed_key() -> None:
    vkey, message, signatures = _signed_note_example()
    key = VerifierKey.from_vkey(vkey)
    ((name, blob),) = signatures
    assert name == key.name
    # A signed-note signature line carries the 4-byte key id, then the signature.
    assert blob[:4] == key.key_id_bytes
    assert key.verify(blob[4:], message)
    assert not key.verify(blob[4:], message + b"tampered")


@pytest.mark.parametrize(
    ("vkey", "why"),
    [
        (vkey_text("n", "00000000", b"\x01" + PUBLIC), "wrong key id"),
        (vkey_text("n", expected_key_id("n", PUBLIC)[:7], b"\x01" + PUBLIC), "short key id"),
        (vkey_text("other", expected_key_id("n", PUBLIC), b"\x01" + PUBLIC), "id of another name"),
        (f"n+{expected_key_id('n', PUBLIC)}+!!!notbase64!!!", "bad base64"),
        (vkey_text("n", expected_key_id("n", PUBLIC), b"\x01" + PUBLIC)[:-1], "broken padding"),
        (vkey_text("n", expected_key_id("n", PUBLIC[:31]), b"\x01" + PUBLIC[:31]), "31-byte key"),
        (vkey_text("n", expected_key_id("n", PUBLIC + b"\x00"), b"\x01" + PUBLIC + b"\x00"), "33-byte key"),
        (vkey_text("n", expected_key_id("n", PUBLIC), b"\x02" + PUBLIC), "not the Ed25519 algorithm byte"),
        (f"n+{expected_key_id('n', PUBLIC)}", "no key part"),
        ("just-a-name", "no separators"),
        (vkey_text("", expected_key_id("", PUBLIC), b"\x01" + PUBLIC), "empty name"),
    ],
)
def test_malformed_vkey_is_rejected(vkey: str, why: str) -> None:
    with pytest.raises(KeyFormatError):
        VerifierKey.from_vkey(vkey)


@pytest.mark.parametrize("name", ["", "has space", "has+plus", "tab\there", "nl\n"])
def test_key_names_must_be_non_empty_without_spaces_or_plus(name: str) -> None:
    with pytest.raises(KeyFormatError):
        VerifierKey.from_public_key(name, PUBLIC)


# --- signing key


def test_signing_key_signs_what_its_verifier_verifies() -> None:
    key = SigningKey.generate("host/ccos-obsd")
    signature = key.sign(b"message")
    assert len(signature) == 64
    assert key.verifier.verify(signature, b"message")
    assert not key.verifier.verify(signature, b"messagE")
    assert key.key_id == key.verifier.key_id == expected_key_id("host/ccos-obsd", key.verifier.public_key)


def test_signer_key_string_format() -> None:
    key = SigningKey("host/ccos-obsd", Ed25519PrivateKey.from_private_bytes(SEED))
    key_id = expected_key_id("host/ccos-obsd", PUBLIC)
    assert key.skey() == "PRIVATE+KEY+" + vkey_text("host/ccos-obsd", key_id, b"\x01" + SEED)


def test_signer_key_round_trip() -> None:
    key = SigningKey.generate("host/ccos-obsd")
    loaded = SigningKey.from_skey(key.skey() + "\n")
    assert loaded.verifier == key.verifier
    assert loaded.skey() == key.skey()
    # Ed25519 is deterministic: the same seed gives the same signature.
    assert loaded.sign(b"m") == key.sign(b"m")


@pytest.mark.parametrize(
    ("skey", "why"),
    [
        (vkey_text("n", expected_key_id("n", PUBLIC), b"\x01" + SEED), "no PRIVATE+KEY+ prefix"),
        ("PRIVATE+KEY+" + vkey_text("n", "00000000", b"\x01" + SEED), "wrong key id"),
        ("PRIVATE+KEY+n+" + expected_key_id("n", PUBLIC) + "+%%%", "bad base64"),
        ("PRIVATE+KEY+" + vkey_text("n", expected_key_id("n", PUBLIC), b"\x01" + SEED[:16]), "short seed"),
        ("PRIVATE+KEY+" + vkey_text("n", expected_key_id("n", PUBLIC), b"\x02" + SEED), "wrong algorithm"),
        ("PRIVATE+KEY+" + vkey_text("", expected_key_id("", PUBLIC), b"\x01" + SEED), "empty name"),
    ],
)
def test_malformed_signer_key_is_rejected(skey: str, why: str) -> None:
    with pytest.raises(KeyFormatError):
        SigningKey.from_skey(skey)


# --- the key file


def test_key_file_is_created_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    key, created = load_or_create_signing_key(path, "host/ccos-obsd")
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text(encoding="ascii") == key.skey() + "\n"
    assert key.verifier.name == "host/ccos-obsd"


def test_key_file_is_loaded_not_replaced_on_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    first, _ = load_or_create_signing_key(path, "host/ccos-obsd")
    again, created = load_or_create_signing_key(path, "a-different-name")
    assert not created
    assert again.verifier == first.verifier
    assert again.sign(b"m") == first.sign(b"m")


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o666])
def test_key_file_readable_by_group_or_others_is_refused_naming_the_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "signing.key"
    load_or_create_signing_key(path, "host/ccos-obsd")
    path.chmod(mode)
    with pytest.raises(StartupError, match=f"{mode:04o}"):
        load_or_create_signing_key(path, "host/ccos-obsd")


def test_owner_read_only_key_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    key, _ = load_or_create_signing_key(path, "host/ccos-obsd")
    path.chmod(0o400)
    loaded, created = load_or_create_signing_key(path, "host/ccos-obsd")
    assert not created
    assert loaded.verifier == key.verifier


def test_unreadable_key_file_content_is_a_startup_error(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    path.write_text("not a key\n", encoding="ascii")
    path.chmod(0o600)
    with pytest.raises(StartupError, match="unreadable"):
        load_or_create_signing_key(path, "host/ccos-obsd")


def test_key_path_that_is_a_directory_is_a_startup_error(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    path.mkdir(mode=0o700)
    with pytest.raises(StartupError):
        load_or_create_signing_key(path, "host/ccos-obsd")
