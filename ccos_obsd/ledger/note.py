"""C2SP signed notes, tlog checkpoints and tlog proofs (text formats, Ed25519 only).

- c2sp.org/signed-note: ``<text ending in newline>`` + blank line + one or more
  ``\u2014 <key name> <base64(4-byte key id || signature)>`` lines.
- c2sp.org/tlog-checkpoint: a note whose text is ``<origin>\\n<size>\\n<base64 root>\\n``
  then optional extension lines. Our origin is the log's key name.
- c2sp.org/tlog-proof@v1: ``c2sp.org/tlog-proof@v1``, an optional ``extra <base64>``
  line, ``index <N>``, the inclusion proof (one base64 hash a line, bottom-up), a blank
  line, then the signed checkpoint verbatim. Ours always carries the entry's stored
  bytes as the extra data, so a proof verifies offline with only the verifier keys.

Parsing is strict (canonical base64, decimal without leading zeroes) so that each
value has one text. ``verify_*`` return what they verified or raise a :class:`NoteError`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ccos_obsd.errors import MalformedNoteError, NoteSignatureError, UntrustedNoteError
from ccos_obsd.ledger.hashing import HASH_SIZE, Hash, leaf_hash
from ccos_obsd.ledger.keys import SigningKey, VerifierKey
from ccos_obsd.ledger.merkle import verify_inclusion

SIGNATURE_LINE_PREFIX = "\u2014 "  # em dash, space
KEY_ID_SIZE = 4
ED25519_SIGNATURE_SIZE = 64
MAX_SIGNATURES = 100
"""Notes with more signature lines are refused (the spec asks verifiers to accept 16)."""

TLOG_PROOF_HEADER = "c2sp.org/tlog-proof@v1"
MAX_TREE_SIZE = 2**64 - 1

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x09\x0b-\x1f]")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: the key name, its 4-byte id and the signature bytes."""

    key_name: str
    key_id: bytes
    signature: bytes

    def to_line(self) -> str:
        encoded = base64.b64encode(self.key_id + self.signature).decode("ascii")
        return f"{SIGNATURE_LINE_PREFIX}{self.key_name} {encoded}\n"


# --- small strict parsers


def _as_text(data: str | bytes, what: str) -> str:
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedNoteError(f"{what} is not valid UTF-8") from exc
    return data


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedNoteError(f"{what} is not valid Unicode text") from exc


def _b64decode(text: str, what: str) -> bytes:
    """Standard, padded base64, and only its canonical form (one text per value)."""
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedNoteError(f"{what} is not base64") from exc
    if base64.b64encode(decoded).decode("ascii") != text:
        raise MalformedNoteError(f"{what} is not canonical base64")
    return decoded


def _decimal(text: str, what: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise MalformedNoteError(f"{what} {text!r} is not a decimal number without leading zeroes")
    value = int(text)
    if value > MAX_TREE_SIZE:
        raise MalformedNoteError(f"{what} {text} does not fit in 64 bits")
    return value


def _check_key_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise MalformedNoteError(f"key name {name!r} must be non-empty, without spaces or '+'")


def _check_note_text(text: str) -> None:
    if not text.endswith("\n"):
        raise MalformedNoteError("note text must end with a newline")
    if _CONTROL_CHARACTERS.search(text):
        raise MalformedNoteError("note text contains a control character other than newline")
    _utf8(text, "note text")


# --- signed notes


def parse_note(note: str | bytes) -> tuple[str, list[NoteSignature]]:
    """Split a signed note into its text and signatures, checking only the format."""
    note = _as_text(note, "note")
    if _CONTROL_CHARACTERS.search(note):
        raise MalformedNoteError("note contains a control character other than newline")
    _utf8(note, "note")
    split = note.rfind("\n\n")
    if split < 0:
        raise MalformedNoteError("note has no blank line before its signatures")
    text, signature_block = note[: split + 1], note[split + 2 :]
    if not signature_block.endswith("\n"):
        raise MalformedNoteError("note must end with a signature line and a newline")
    lines = signature_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNoteError(f"note has {len(lines)} signatures, more than {MAX_SIGNATURES}")
    return text, [_parse_signature_line(line) for line in lines]


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(SIGNATURE_LINE_PREFIX):
        raise MalformedNoteError(f"signature line {line[:40]!r} does not start with an em dash and a space")
    name, sep, encoded = line[len(SIGNATURE_LINE_PREFIX) :].partition(" ")
    if not sep:
        raise MalformedNoteError(f"signature line {line[:40]!r} has no signature after the key name")
    _check_key_name(name)
    raw = _b64decode(encoded, f"signature of {name}")
    if len(raw) <= KEY_ID_SIZE:
        raise MalformedNoteError(f"signature of {name} is too short")
    return NoteSignature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


def sign_note(text: str, *signing_keys: SigningKey) -> str:
    """Sign ``text`` (ending in a newline) with each key; returns the signed note."""
    if not signing_keys:
        raise ValueError("sign_note needs at least one key")
    _check_note_text(text)
    message = text.encode("utf-8")
    lines = [
        NoteSignature(key.verifier.name, key.verifier.key_id_bytes, key.sign(message)).to_line() for key in signing_keys
    ]
    return text + "\n" + "".join(lines)


def verify_note(note: str | bytes, verifier_keys: Iterable[VerifierKey]) -> tuple[str, list[str]]:
    """Verify a signed note; return its text and the names of the keys that signed it.

    As c2sp.org/signed-note says: signatures by unknown keys (name and key id both
    must match) are ignored; a bad signature by a known key rejects the whole note
    (``NoteSignatureError``); a note with no signature by a known key is rejected
    (``UntrustedNoteError``).
    """
    text, signatures = parse_note(note)
    known: dict[tuple[str, bytes], list[VerifierKey]] = {}
    for key in verifier_keys:
        known.setdefault((key.name, key.key_id_bytes), []).append(key)
    message = text.encode("utf-8")
    verified: list[str] = []
    for signature in signatures:
        candidates = known.get((signature.key_name, signature.key_id))
        if candidates is None:
            continue
        valid = len(signature.signature) == ED25519_SIGNATURE_SIZE and any(
            key.verify(signature.signature, message) for key in candidates
        )
        if not valid:
            raise NoteSignatureError(f"signature by {signature.key_name} does not verify")
        if signature.key_name not in verified:
            verified.append(signature.key_name)
    if not verified:
        raise UntrustedNoteError("note is not signed by any known key")
    return text, verified


# --- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A tlog checkpoint: the log's origin, its tree size and its RFC 6962 root."""

    origin: str
    size: int
    root_hash: Hash
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin:
            raise MalformedNoteError("checkpoint origin must be one non-empty line")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise MalformedNoteError(f"checkpoint size {self.size} is out of range")
        if len(self.root_hash) != HASH_SIZE:
            raise MalformedNoteError(f"checkpoint root hash is {len(self.root_hash)} bytes, not {HASH_SIZE}")
        if any(not line or "\n" in line for line in self.extensions):
            raise MalformedNoteError("checkpoint extension lines must be non-empty single lines")

    def to_text(self) -> str:
        """The note text (ending in a newline), ready to sign."""
        root = base64.b64encode(self.root_hash).decode("ascii")
        return "".join(f"{line}\n" for line in (self.origin, str(self.size), root, *self.extensions))

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint's note text (the part a signature covers)."""
        if not text.endswith("\n"):
            raise MalformedNoteError("checkpoint text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedNoteError("checkpoint text needs origin, size and root hash lines")
        origin, size, root, *extensions = lines
        root_hash = _b64decode(root, "checkpoint root hash")
        return cls(origin, _decimal(size, "checkpoint size"), Hash(root_hash), tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signing_key: SigningKey) -> str:
    """The checkpoint as a note signed by the log's key (whose name is the origin)."""
    if checkpoint.origin != signing_key.verifier.name:
        raise ValueError(f"checkpoint origin {checkpoint.origin!r} is not the key name {signing_key.verifier.name!r}")
    return sign_note(checkpoint.to_text(), signing_key)


def verify_checkpoint(
    note: str | bytes, verifier_keys: Iterable[VerifierKey], *, origin: str | None = None
) -> Checkpoint:
    """Verify a signed checkpoint and return it.

    The note must be signed by a known key named like the checkpoint's origin (the
    log's own key; other known keys, such as witnesses, may sign too). With
    ``origin``, the checkpoint must also be that log's.
    """
    text, signers = verify_note(note, verifier_keys)
    checkpoint = Checkpoint.from_text(text)
    if origin is not None and checkpoint.origin != origin:
        raise UntrustedNoteError(f"checkpoint is from log {checkpoint.origin!r}, not {origin!r}")
    if checkpoint.origin not in signers:
        raise UntrustedNoteError(f"checkpoint is not signed by the key of its log {checkpoint.origin!r}")
    return checkpoint


# --- tlog proofs


@dataclass(frozen=True)
class TlogProof:
    """A c2sp.org/tlog-proof@v1: index, inclusion proof, signed checkpoint, extra data."""

    index: int
    inclusion_proof: tuple[Hash, ...]
    checkpoint: str
    extra: bytes | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.index <= MAX_TREE_SIZE:
            raise MalformedNoteError(f"tlog proof index {self.index} is out of range")
        if any(len(h) != HASH_SIZE for h in self.inclusion_proof):
            raise MalformedNoteError(f"tlog proof hashes must be {HASH_SIZE} bytes")

    def to_text(self) -> str:
        lines = [TLOG_PROOF_HEADER]
        if self.extra is not None:
            lines.append("extra " + base64.b64encode(self.extra).decode("ascii"))
        lines.append(f"index {self.index}")
        lines.extend(base64.b64encode(h).decode("ascii") for h in self.inclusion_proof)
        return "\n".join(lines) + "\n\n" + self.checkpoint

    @classmethod
    def from_text(cls, text: str | bytes) -> TlogProof:
        """Parse the format; nothing is verified (see :func:`verify_tlog_proof`)."""
        rest = _as_text(text, "tlog proof")
        line, rest = _next_line(rest)
        if line != TLOG_PROOF_HEADER:
            raise MalformedNoteError(f"tlog proof must start with {TLOG_PROOF_HEADER!r}")
        line, rest = _next_line(rest)
        extra = None
        if line.startswith("extra "):
            extra = _b64decode(line[len("extra ") :], "tlog proof extra data")
            line, rest = _next_line(rest)
        if not line.startswith("index "):
            raise MalformedNoteError("tlog proof has no 'index' line (after the optional 'extra' line)")
        index = _decimal(line[len("index ") :], "tlog proof index")
        hashes = []
        line, rest = _next_line(rest)
        while line:  # the inclusion proof ends at the blank line before the checkpoint
            proof_hash = _b64decode(line, "tlog proof hash")
            if len(proof_hash) != HASH_SIZE:
                raise MalformedNoteError(f"tlog proof hash is {len(proof_hash)} bytes, not {HASH_SIZE}")
            hashes.append(Hash(proof_hash))
            line, rest = _next_line(rest)
        if not rest:
            raise MalformedNoteError("tlog proof has no checkpoint after the blank line")
        return cls(index, tuple(hashes), rest, extra)


def _next_line(text: str) -> tuple[str, str]:
    line, sep, rest = text.partition("\n")
    if not sep:
        raise MalformedNoteError("tlog proof ends before its checkpoint")
    return line, rest


def build_tlog_proof(index: int, entry_bytes: bytes, inclusion_proof: Iterable[bytes], signed_checkpoint: str) -> str:
    """The tlog proof of entry ``index``, carrying its exact stored bytes as extra data."""
    proof = TlogProof(index, tuple(Hash(h) for h in inclusion_proof), signed_checkpoint, entry_bytes)
    return proof.to_text()


def verify_tlog_proof(
    text: str | bytes, verifier_keys: Iterable[VerifierKey], *, origin: str | None = None
) -> tuple[int, bytes, Checkpoint]:
    """Verify a tlog proof offline; return the entry's index, its bytes and the checkpoint.

    Checks the checkpoint's signature (:func:`verify_checkpoint`), then that
    ``SHA-256(0x00 || extra)`` is leaf ``index`` of the checkpointed tree. Raises
    :class:`NoteError` or :class:`~ccos_obsd.errors.ProofError`.
    """
    proof = TlogProof.from_text(text)
    checkpoint = verify_checkpoint(proof.checkpoint, verifier_keys, origin=origin)
    if proof.extra is None:
        raise MalformedNoteError("tlog proof has no 'extra' line: the entry bytes are needed to hash the leaf")
    verify_inclusion(leaf_hash(proof.extra), proof.index, checkpoint.size, proof.inclusion_proof, checkpoint.root_hash)
    return proof.index, proof.extra, checkpoint
