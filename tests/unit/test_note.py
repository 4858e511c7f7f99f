"""C2SP signed notes, tlog checkpoints and tlog proofs.

The signed-note example comes from the C2SP specification (shared vectors); the
checkpoint and tlog-proof examples are the ones printed in c2sp.org/tlog-checkpoint
and c2sp.org/tlog-proof. Proofs are built over a tree filled by ``TreeBuilder``.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from ccos_obsd.errors import (
    MalformedNoteError,
    NoteError,
    NoteSignatureError,
    ObsdError,
    ProofError,
    UntrustedNoteError,
)
from ccos_obsd.ledger.hashing import Hash, leaf_hash
from ccos_obsd.ledger.keys import SigningKey, VerifierKey
from ccos_obsd.ledger.merkle import NodeId, TreeBuilder, inclusion_proof
from ccos_obsd.ledger.note import (
    MAX_SIGNATURES,
    TLOG_PROOF_HEADER,
    Checkpoint,
    TlogProof,
    build_tlog_proof,
    parse_note,
    sign_checkpoint,
    sign_note,
    verify_checkpoint,
    verify_note,
    verify_tlog_proof,
)
from tests.vectors import vectors_dir

VECTORS = vectors_dir()
EM_DASH = "\u2014"

LOG_NAME = "ccos-obsd.test/log"
LOG_KEY = SigningKey(LOG_NAME, Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
WITNESS_KEY = SigningKey("witness.test/w1", Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
OTHER_KEY = SigningKey(LOG_NAME, Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34))))
"""Same name as the log key, another key (so another key id)."""


def load_example() -> tuple[VerifierKey, str]:
    """The vkey after ``vkey:`` and the note between the two ``-----`` lines."""
    text = (VECTORS / "signed-note" / "example.txt").read_text(encoding="utf-8")
    vkey = next(line for line in text.splitlines() if line.startswith("vkey: "))[len("vkey: ") :]
    note = text.split("-----\n")[1]
    return VerifierKey.from_vkey(vkey), note


# --- signed notes: the specification's example


def test_the_spec_example_verifies() -> None:
    key, note = load_example()
    assert verify_note(note, [key]) == ("This is an example message.\n", ["example.com/foo"])
    assert verify_note(note.encode("utf-8"), [key])[1] == ["example.com/foo"]


def test_the_spec_example_fails_with_a_tampered_text() -> None:
    key, note = load_example()
    with pytest.raises(NoteSignatureError):
        verify_note(note.replace("an example", "An example"), [key])


def test_the_spec_example_is_untrusted_under_another_key_of_the_same_name() -> None:
    _, note = load_example()
    other = SigningKey.generate("example.com/foo").verifier
    with pytest.raises(UntrustedNoteError):
        verify_note(note, [other])


def test_a_known_name_and_id_with_another_public_key_is_a_bad_signature() -> None:
    key, note = load_example()
    impostor = VerifierKey(key.name, key.key_id, OTHER_KEY.verifier.public_key)
    with pytest.raises(NoteSignatureError):
        verify_note(note, [impostor])


def test_note_errors_are_obsd_errors() -> None:
    for error in (MalformedNoteError, NoteSignatureError, UntrustedNoteError):
        assert issubclass(error, NoteError)
    assert issubclass(NoteError, ObsdError)


# --- signed notes: signing and the verification rules


def test_a_signature_line_is_em_dash_name_and_base64_of_key_id_and_signature() -> None:
    note = sign_note("hello\n", LOG_KEY)
    text, _, line = note.partition("\n\n")
    assert text == "hello"
    signature = LOG_KEY.sign(b"hello\n")  # Ed25519 is deterministic
    expected = base64.b64encode(LOG_KEY.verifier.key_id_bytes + signature).decode()
    assert line == f"{EM_DASH} {LOG_NAME} {expected}\n"
    assert verify_note(note, [LOG_KEY.verifier]) == ("hello\n", [LOG_NAME])


def test_a_note_with_several_signatures_reports_the_known_ones_in_order() -> None:
    note = sign_note("text\n\nwith a blank line\n", LOG_KEY, WITNESS_KEY)
    keys = [WITNESS_KEY.verifier, LOG_KEY.verifier]
    assert verify_note(note, keys) == ("text\n\nwith a blank line\n", [LOG_NAME, WITNESS_KEY.verifier.name])
    assert verify_note(note, [WITNESS_KEY.verifier])[1] == [WITNESS_KEY.verifier.name]


def test_signatures_by_unknown_keys_are_ignored() -> None:
    note = sign_note("text\n", LOG_KEY)
    unknown_id = base64.b64encode(b"\x00\x01\x02\x03" + bytes(64)).decode()
    # Same name as a known key but another id, and an unknown name: both ignored.
    with_strangers = note + f"{EM_DASH} {LOG_NAME} {unknown_id}\n{EM_DASH} stranger.example {unknown_id}\n"
    assert verify_note(with_strangers, [LOG_KEY.verifier]) == ("text\n", [LOG_NAME])


def test_one_bad_signature_by_a_known_key_rejects_the_note() -> None:
    note = sign_note("text\n", LOG_KEY, WITNESS_KEY)
    forged = base64.b64encode(WITNESS_KEY.verifier.key_id_bytes + bytes(64)).decode()
    with pytest.raises(NoteSignatureError, match=r"witness\.test/w1"):
        verify_note(note + f"{EM_DASH} witness.test/w1 {forged}\n", [LOG_KEY.verifier, WITNESS_KEY.verifier])


def test_a_signature_of_the_wrong_length_by_a_known_key_is_bad() -> None:
    short = base64.b64encode(LOG_KEY.verifier.key_id_bytes + LOG_KEY.sign(b"text\n")[:63]).decode()
    with pytest.raises(NoteSignatureError):
        verify_note(f"text\n\n{EM_DASH} {LOG_NAME} {short}\n", [LOG_KEY.verifier])


def test_a_note_needs_a_known_key() -> None:
    with pytest.raises(UntrustedNoteError):
        verify_note(sign_note("text\n", LOG_KEY), [])


def test_the_note_accepts_the_spec_minimum_of_16_signatures() -> None:
    keys = [SigningKey.generate(f"witness.test/{i}") for i in range(16)]
    note = sign_note("sixteen\n", *keys)
    assert len(verify_note(note, [k.verifier for k in keys])[1]) == 16


def signature_line(name: str = LOG_NAME, payload: bytes = b"\x00" * 68) -> str:
    return f"{EM_DASH} {name} {base64.b64encode(payload).decode()}"


GOOD_LINE = signature_line()


@pytest.mark.parametrize(
    "note",
    [
        pytest.param(f"text\n{GOOD_LINE}\n", id="no-blank-line"),
        pytest.param(f"text\n\n{GOOD_LINE}", id="no-final-newline"),
        pytest.param("text\n\n", id="no-signatures"),
        pytest.param(f"text\n\n{GOOD_LINE}\n\n", id="trailing-blank-line"),
        pytest.param(f"text\n\n- {LOG_NAME} AAAA\n", id="hyphen-not-em-dash"),
        pytest.param(f"text\n\n{EM_DASH}{LOG_NAME} AAAAAAAA\n", id="no-space-after-dash"),
        pytest.param(f"text\n\n{EM_DASH} {LOG_NAME}\n", id="no-signature"),
        pytest.param(f"text\n\n{signature_line('a+b')}\n", id="plus-in-name"),
        pytest.param(f"text\n\n{signature_line('')}\n", id="empty-name"),
        pytest.param(f"text\n\n{EM_DASH} {LOG_NAME} not*base64\n", id="bad-base64"),
        pytest.param(f"text\n\n{EM_DASH} {LOG_NAME} AAAAAAB=\n", id="non-canonical-base64"),
        pytest.param(f"text\n\n{EM_DASH} {LOG_NAME} AAAAAAA\n", id="missing-padding"),
        pytest.param(f"text\n\n{GOOD_LINE} extra\n", id="trailing-field"),
        pytest.param(f"text\n\n{signature_line(payload=bytes(4))}\n", id="key-id-only"),
        pytest.param(f"te\txt\n\n{GOOD_LINE}\n", id="tab"),
        pytest.param(f"text\r\n\n{GOOD_LINE}\n", id="carriage-return"),
        pytest.param(f"text\n\n{GOOD_LINE}\r\n", id="carriage-return-in-signatures"),
        pytest.param(b"caf\xe9\n\n" + GOOD_LINE.encode() + b"\n", id="not-utf8"),
        pytest.param("\ud800\n\n" + GOOD_LINE + "\n", id="lone-surrogate"),
        pytest.param("text\n\n" + f"{GOOD_LINE}\n" * (MAX_SIGNATURES + 1), id="too-many-signatures"),
    ],
)
def test_malformed_notes_are_refused(note: str | bytes) -> None:
    with pytest.raises(MalformedNoteError):
        parse_note(note)
    with pytest.raises(MalformedNoteError):
        verify_note(note, [LOG_KEY.verifier])


@pytest.mark.parametrize("text", ["no final newline", "tab\there\n", "bell\x07\n", "\ud800\n"])
def test_sign_note_refuses_text_that_cannot_be_a_note(text: str) -> None:
    with pytest.raises(MalformedNoteError):
        sign_note(text, LOG_KEY)


def test_sign_note_needs_a_key() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        sign_note("text\n")


CONTROL_CHARACTERS = [chr(c) for c in range(32)]
note_texts = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters=CONTROL_CHARACTERS) | st.just("\n"),
    max_size=200,
).map(lambda text: text + "\n")


@given(note_texts)
def test_any_note_text_round_trips(text: str) -> None:
    assert verify_note(sign_note(text, LOG_KEY), [LOG_KEY.verifier]) == (text, [LOG_NAME])


@given(note_texts, st.data())
def test_any_change_to_a_signed_text_fails(text: str, data: st.DataObject) -> None:
    note = sign_note(text, LOG_KEY)
    position = data.draw(st.integers(0, len(text) - 1), label="position")
    replacement = data.draw(st.sampled_from("a\n\u00e9"), label="replacement")
    changed = text[:position] + replacement + text[position + 1 :]
    if changed == text:
        changed = text[:position] + replacement + text[position:]  # insert instead
    with pytest.raises(NoteError):
        verify_note(changed + note[len(text) :], [LOG_KEY.verifier])


# --- checkpoints

SPEC_CHECKPOINT = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"


def test_the_spec_checkpoint_parses_and_prints_back() -> None:
    checkpoint = Checkpoint.from_text(SPEC_CHECKPOINT)
    assert checkpoint.origin == "example.com/behind-the-sofa"
    assert checkpoint.size == 20852163
    assert checkpoint.root_hash == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert checkpoint.extensions == ()
    assert checkpoint.to_text() == SPEC_CHECKPOINT


def test_a_checkpoint_is_origin_size_and_base64_root_then_extension_lines() -> None:
    root = Hash(bytes(range(32)))
    checkpoint = Checkpoint(LOG_NAME, 0, root, ("ext one", "ext two"))
    expected = f"{LOG_NAME}\n0\n{base64.b64encode(root).decode()}\next one\next two\n"
    assert checkpoint.to_text() == expected
    assert Checkpoint.from_text(expected) == checkpoint


def test_a_signed_checkpoint_verifies_and_names_its_log() -> None:
    checkpoint = Checkpoint(LOG_NAME, 42, Hash(bytes(32)))
    note = sign_checkpoint(checkpoint, LOG_KEY)
    assert note.startswith(checkpoint.to_text() + "\n" + EM_DASH + " " + LOG_NAME + " ")
    assert verify_checkpoint(note, [LOG_KEY.verifier]) == checkpoint
    assert verify_checkpoint(note, [LOG_KEY.verifier], origin=LOG_NAME) == checkpoint


def test_a_checkpoint_must_be_signed_by_the_key_named_like_its_origin() -> None:
    checkpoint = Checkpoint(LOG_NAME, 1, Hash(bytes(32)))
    with pytest.raises(ValueError, match="is not the key name"):
        sign_checkpoint(checkpoint, WITNESS_KEY)
    witnessed_only = sign_note(checkpoint.to_text(), WITNESS_KEY)
    with pytest.raises(UntrustedNoteError, match="key of its log"):
        verify_checkpoint(witnessed_only, [LOG_KEY.verifier, WITNESS_KEY.verifier])


def test_a_checkpoint_of_another_log_is_refused() -> None:
    note = sign_checkpoint(Checkpoint(LOG_NAME, 1, Hash(bytes(32))), LOG_KEY)
    with pytest.raises(UntrustedNoteError, match=r"not 'other\.example/log'"):
        verify_checkpoint(note, [LOG_KEY.verifier], origin="other.example/log")


def test_a_cosigned_checkpoint_verifies_with_only_the_log_key() -> None:
    checkpoint = Checkpoint(LOG_NAME, 7, Hash(bytes(32)))
    note = sign_note(checkpoint.to_text(), LOG_KEY, WITNESS_KEY)
    assert verify_checkpoint(note, [LOG_KEY.verifier]) == checkpoint


def test_a_checkpoint_with_an_altered_size_fails() -> None:
    note = sign_checkpoint(Checkpoint(LOG_NAME, 42, Hash(bytes(32))), LOG_KEY)
    with pytest.raises(NoteSignatureError):
        verify_checkpoint(note.replace("\n42\n", "\n43\n"), [LOG_KEY.verifier])


ROOT_B64 = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"log\n1\n{ROOT_B64}", id="no-final-newline"),
        pytest.param("log\n1\n", id="no-root"),
        pytest.param(f"\n1\n{ROOT_B64}\n", id="empty-origin"),
        pytest.param(f"log\n01\n{ROOT_B64}\n", id="leading-zero"),
        pytest.param(f"log\n+1\n{ROOT_B64}\n", id="plus-sign"),
        pytest.param(f"log\n 1\n{ROOT_B64}\n", id="space"),
        pytest.param(f"log\n-1\n{ROOT_B64}\n", id="negative"),
        pytest.param(f"log\n1_000\n{ROOT_B64}\n", id="underscore"),
        pytest.param(f"log\n\u0661\n{ROOT_B64}\n", id="arabic-digit"),
        pytest.param(f"log\n{2**64}\n{ROOT_B64}\n", id="beyond-64-bits"),
        pytest.param("log\n1\nnot base64!\n", id="root-not-base64"),
        pytest.param(f"log\n1\n{base64.b64encode(bytes(31)).decode()}\n", id="root-31-bytes"),
        pytest.param(f"log\n1\n{ROOT_B64}\n\n", id="empty-extension-line"),
    ],
)
def test_malformed_checkpoints_are_refused(text: str) -> None:
    with pytest.raises(MalformedNoteError):
        Checkpoint.from_text(text)


def test_a_checkpoint_cannot_be_built_malformed() -> None:
    with pytest.raises(MalformedNoteError):
        Checkpoint("", 1, Hash(bytes(32)))
    with pytest.raises(MalformedNoteError):
        Checkpoint("log", -1, Hash(bytes(32)))
    with pytest.raises(MalformedNoteError):
        Checkpoint("log", 1, Hash(bytes(31)))
    with pytest.raises(MalformedNoteError):
        Checkpoint("log", 1, Hash(bytes(32)), ("",))


origins = st.text(
    alphabet=st.characters(exclude_categories=["Cs", "Zs"], exclude_characters=CONTROL_CHARACTERS),
    min_size=1,
    max_size=40,
)


@given(origins, st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32))
def test_any_checkpoint_round_trips(origin: str, size: int, root: bytes) -> None:
    checkpoint = Checkpoint(origin, size, Hash(root))
    assert Checkpoint.from_text(checkpoint.to_text()) == checkpoint


# --- tlog proofs

SPEC_PROOF = f"""{TLOG_PROOF_HEADER}
extra YWdlLXYxLjIuMS1kYXJ3aW4tYXJtNjQudGFyLmd6kYXJ3aW4tYXJ
index 73894
gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=
B95lDa8R83lS8n0eG+o0buTxRKQTYFi//1U8anccXmA=
EKNzoDWG8LGC0Yp9o+sv3qllpMP9uHQ9B20KNL+Q1zs=
RoopEkOdqkYqMB4MJXrbt/hMjOxsVn0IrWjpz1ZMMes=
AHCioX9nLjsrse6YhjRRmk1WUEirVOLLRoOQ6vfO5vk=

example.com/fancylog
109482
sFodV/vSp5O8n9a8QpW6PRY97tfOSW5bsc2Xl/EQi08=

{EM_DASH} example.com/fancylog hI2DJw[...]1roloI=
"""


def test_the_spec_tlog_proof_parses_and_prints_back() -> None:
    proof = TlogProof.from_text(SPEC_PROOF)
    assert proof.index == 73894
    assert proof.extra == base64.b64decode("YWdlLXYxLjIuMS1kYXJ3aW4tYXJtNjQudGFyLmd6kYXJ3aW4tYXJ")
    assert len(proof.inclusion_proof) == 5
    assert proof.inclusion_proof[0] == base64.b64decode("gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=")
    assert proof.checkpoint.startswith("example.com/fancylog\n109482\n")
    assert proof.to_text() == SPEC_PROOF


ENTRIES = [f'{{"action_type":"PlanStarted","seq":{seq}}}'.encode() for seq in range(300)]


class MemoryNodes:
    def __init__(self) -> None:
        self.builder = TreeBuilder()
        self.nodes: dict[NodeId, bytes] = dict(self.builder.extend(leaf_hash(e) for e in ENTRIES))

    def get_hashes(self, ids: Sequence[NodeId]) -> list[bytes]:
        return [self.nodes[node] for node in ids]


TREE = MemoryNodes()
SIGNED_CHECKPOINT = sign_checkpoint(Checkpoint(LOG_NAME, len(ENTRIES), TREE.builder.root()), LOG_KEY)


def make_proof(seq: int) -> str:
    return build_tlog_proof(seq, ENTRIES[seq], inclusion_proof(seq, len(ENTRIES), TREE), SIGNED_CHECKPOINT)


@pytest.mark.parametrize("seq", [0, 1, 255, 256, 298, 299])
def test_a_tlog_proof_verifies_offline_and_returns_the_entry(seq: int) -> None:
    index, entry, checkpoint = verify_tlog_proof(make_proof(seq), [LOG_KEY.verifier])
    assert (index, entry) == (seq, ENTRIES[seq])
    assert checkpoint == Checkpoint(LOG_NAME, 300, TREE.builder.root())
    assert verify_tlog_proof(make_proof(seq).encode(), [LOG_KEY.verifier], origin=LOG_NAME)[0] == seq


def test_a_tlog_proof_is_header_extra_index_hashes_blank_line_checkpoint() -> None:
    hashes = inclusion_proof(5, 300, TREE)
    lines = make_proof(5).split("\n")
    assert lines[0] == "c2sp.org/tlog-proof@v1"
    assert lines[1] == "extra " + base64.b64encode(ENTRIES[5]).decode()
    assert lines[2] == "index 5"
    assert lines[3 : 3 + len(hashes)] == [base64.b64encode(h).decode() for h in hashes]
    assert lines[3 + len(hashes)] == ""
    assert "\n".join(lines[4 + len(hashes) :]) == SIGNED_CHECKPOINT


def replace_line(text: str, number: int, line: str) -> str:
    lines = text.split("\n")
    lines[number] = line
    return "\n".join(lines)


def test_a_tlog_proof_of_other_entry_bytes_fails() -> None:
    tampered = replace_line(make_proof(5), 1, "extra " + base64.b64encode(ENTRIES[5] + b" ").decode())
    with pytest.raises(ProofError):
        verify_tlog_proof(tampered, [LOG_KEY.verifier])
    moved = replace_line(make_proof(5), 1, "extra " + base64.b64encode(ENTRIES[6]).decode())
    with pytest.raises(ProofError):
        verify_tlog_proof(moved, [LOG_KEY.verifier])


def test_a_tlog_proof_at_another_index_fails() -> None:
    with pytest.raises(ProofError):
        verify_tlog_proof(replace_line(make_proof(5), 2, "index 4"), [LOG_KEY.verifier])
    with pytest.raises(ProofError):
        verify_tlog_proof(replace_line(make_proof(5), 2, "index 300"), [LOG_KEY.verifier])


def test_a_tlog_proof_with_an_altered_hash_fails() -> None:
    proof = make_proof(5)
    hash_line = proof.split("\n")[3]
    altered = base64.b64encode(bytes(32)).decode()
    assert hash_line != altered
    with pytest.raises(ProofError):
        verify_tlog_proof(replace_line(proof, 3, altered), [LOG_KEY.verifier])


def test_a_tlog_proof_with_an_altered_checkpoint_fails() -> None:
    with pytest.raises(NoteSignatureError):
        verify_tlog_proof(make_proof(5).replace("\n300\n", "\n301\n"), [LOG_KEY.verifier])


def test_a_tlog_proof_needs_the_log_key() -> None:
    with pytest.raises(UntrustedNoteError):
        verify_tlog_proof(make_proof(5), [OTHER_KEY.verifier])
    with pytest.raises(UntrustedNoteError):
        verify_tlog_proof(make_proof(5), [LOG_KEY.verifier], origin="other.example/log")


def test_a_tlog_proof_without_extra_cannot_be_verified() -> None:
    proof = TlogProof.from_text(make_proof(5))
    bare = TlogProof(proof.index, proof.inclusion_proof, proof.checkpoint).to_text()
    assert bare.split("\n")[1] == "index 5"
    with pytest.raises(MalformedNoteError, match="extra"):
        verify_tlog_proof(bare, [LOG_KEY.verifier])


def test_an_empty_extra_line_is_empty_data() -> None:
    proof = TlogProof(0, (), SIGNED_CHECKPOINT, b"")
    assert proof.to_text().split("\n")[1] == "extra "
    assert TlogProof.from_text(proof.to_text()) == proof


def test_a_tlog_proof_cannot_be_built_malformed() -> None:
    with pytest.raises(MalformedNoteError):
        TlogProof(-1, (), SIGNED_CHECKPOINT)
    with pytest.raises(MalformedNoteError):
        build_tlog_proof(0, ENTRIES[0], [bytes(31)], SIGNED_CHECKPOINT)


def malformed_proofs() -> list[object]:
    good = make_proof(5)
    lines = good.split("\n")
    return [
        pytest.param(good.replace(TLOG_PROOF_HEADER, "c2sp.org/tlog-proof@v2"), id="wrong-header"),
        pytest.param("\n".join([lines[0], lines[2], lines[1], *lines[3:]]), id="index-before-extra"),
        pytest.param(replace_line(good, 2, "index 05"), id="leading-zero-index"),
        pytest.param(replace_line(good, 2, "index -1"), id="negative-index"),
        pytest.param(replace_line(good, 2, "index  5"), id="two-spaces"),
        pytest.param(replace_line(good, 1, "extra not base64"), id="extra-not-base64"),
        pytest.param(replace_line(good, 3, base64.b64encode(bytes(31)).decode()), id="short-hash"),
        pytest.param(replace_line(good, 3, "???"), id="hash-not-base64"),
        pytest.param("\n".join(lines[: lines.index("")]) + "\n", id="no-checkpoint"),
        pytest.param("\n".join(lines[: lines.index("")]), id="truncated"),
        pytest.param(f"{TLOG_PROOF_HEADER}\n", id="header-only"),
        pytest.param(b"\xff" + good.encode(), id="not-utf8"),
    ]


@pytest.mark.parametrize("text", malformed_proofs())
def test_malformed_tlog_proofs_are_refused(text: str | bytes) -> None:
    with pytest.raises(MalformedNoteError):
        verify_tlog_proof(text, [LOG_KEY.verifier])


@given(st.integers(0, len(ENTRIES) - 1))
def test_every_entry_has_a_verifying_tlog_proof(seq: int) -> None:
    text = make_proof(seq)
    assert TlogProof.from_text(text).to_text() == text
    assert verify_tlog_proof(text, [LOG_KEY.verifier])[:2] == (seq, ENTRIES[seq])
