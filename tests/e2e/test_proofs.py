"""Signed checkpoints and Merkle proofs from a live daemon, checked by the offline verifier.

A checkpoint is a C2SP signed note over the RFC 6962 root of every leaf hash; an
inclusion proof is a C2SP tlog-proof that carries the entry's bytes and the
checkpoint, so ``ccos-obsd verify --proof`` needs nothing but the verifier key.
Roots are recomputed here from the stored leaf hashes, independently of the daemon.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ccos_obsd.errors import ProofError
from ccos_obsd.ledger.keys import VerifierKey
from ccos_obsd.ledger.merkle import verify_consistency
from ccos_obsd.ledger.note import verify_checkpoint
from tests.daemon import DaemonProcess, run_cli
from tests.e2e.ledger_helpers import (
    FAILED,
    append_plans,
    checkpoint_note,
    checkpoint_size,
    leaf_hashes,
    output_of,
    parse_checkpoint,
    proof_rejected,
    stored_checkpoints,
    tree_root,
    verify_ok,
    vkeys,
    wait_for_checkpoint,
)

SHORT_INTERVAL = {"CCOS_OBSD_CHECKPOINT_INTERVAL": "0.2"}
LONG_INTERVAL = {"CCOS_OBSD_CHECKPOINT_INTERVAL": "3600"}
CHECKPOINT_MODE = {"CCOS_OBSD_SIGNING_MODE": "checkpoint"}
CONSISTENCY_FIELDS = {"size1", "size2", "root1", "root2", "proof"}
PROOF_OK = re.compile(r"^ok: entry (\d+) is in the log (\S+) of size (\d+) ")


@dataclass
class Live:
    daemon: DaemonProcess
    vkey: str

    @property
    def state_dir(self) -> Path:
        return self.daemon.state_dir

    @property
    def socket(self) -> str:
        return str(self.daemon.socket_path)

    def settled_head(self) -> int:
        """Entries in the ledger, once a checkpoint covers all of them."""
        with self.daemon.client() as client:
            head = client.ping()
            wait_for_checkpoint(client, head)
        return head


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """One daemon (checkpoint.interval 0.2 s) with 40 entries, shared by the read-only tests."""
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory:
        daemon = DaemonProcess(Path(directory), env=SHORT_INTERVAL, reader=True).start()  # GETs inclusion proofs
        try:
            with daemon.client() as client:
                append_plans(client, 0, 25)
                append_plans(client, 25, 15)
                wait_for_checkpoint(client, 40)
            (vkey,) = vkeys(daemon.state_dir)
            yield Live(daemon, vkey)
        finally:
            assert daemon.stop() == 0


def verify_proof_ok(proof: bytes, vkey: str, seq: int) -> re.Match[str]:
    output = verify_ok("--proof", "-", "--vkey", vkey, input=proof)
    found = PROOF_OK.match(output)
    assert found, output
    assert int(found.group(1)) == seq, output
    return found


def prove(live: Live, *target: str) -> bytes:
    result = run_cli("prove", *target, "--socket", live.socket)
    assert result.returncode == 0, output_of(result)
    return result.stdout


def proof_extra(proof: bytes) -> bytes:
    """The entry bytes a tlog-proof carries on its ``extra`` line."""
    lines = proof.decode().split("\n")
    assert lines[0] == "c2sp.org/tlog-proof@v1", lines[0]
    assert lines[1].startswith("extra "), lines[1]
    return base64.b64decode(lines[1][len("extra "):], validate=True)


# --- checkpoints


def check_checkpoint(note: str, vkey: str, state_dir: Path) -> None:
    """The C2SP shape, the signature under the published key, and the root of the stored leaves."""
    parsed = parse_checkpoint(note)
    key = VerifierKey.from_vkey(vkey)
    assert parsed.origin == key.name
    assert parsed.signatures == [(key.name, bytes.fromhex(key.key_id), parsed.signatures[0][2])]
    checkpoint = verify_checkpoint(note, [key], origin=key.name)
    assert (checkpoint.size, checkpoint.root_hash) == (parsed.size, parsed.root)
    assert parsed.size > 0
    assert tree_root(leaf_hashes(state_dir)[: parsed.size]) == parsed.root


def test_checkpoint_from_socket_and_http_is_a_signed_note_over_the_root(live: Live) -> None:
    head = live.settled_head()
    with live.daemon.client() as client:
        over_socket = checkpoint_note(client)
    status, headers, body = live.daemon.get("/v1/checkpoint")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain"), headers
    over_http = body.decode("utf-8")
    assert over_socket is not None
    for note in (over_socket, over_http):
        check_checkpoint(note, live.vkey, live.state_dir)
        assert parse_checkpoint(note).size == head


def test_checkpoint_follows_within_the_interval_without_further_appends(live: Live) -> None:
    with live.daemon.client() as client:
        head = live.settled_head()
        # The commit that appends may carry a checkpoint itself (when the interval has
        # run out); append until one does not, so the timer is what must cover it.
        for attempt in range(20):
            append_plans(client, 1000 + attempt, 1)
            head += 1
            if checkpoint_size(client) < head:
                break
        else:
            pytest.fail("every append carried its own checkpoint; the interval timer was never needed")
        note = wait_for_checkpoint(client, head, timeout=5.0)
        assert client.ping() == head
    assert parse_checkpoint(note).size == head
    check_checkpoint(note, live.vkey, live.state_dir)


def test_a_checkpoint_is_written_at_shutdown(state_dir: Path) -> None:
    daemon = DaemonProcess(state_dir, env=LONG_INTERVAL).start()
    try:
        with daemon.client() as client:
            for i in range(10):
                append_plans(client, i, 1)
            # The first commit is checkpointed at once; with an hour's interval, no other.
            assert checkpoint_size(client) < 10
    finally:
        assert daemon.stop() == 0
    (vkey,) = vkeys(state_dir)
    size, note = stored_checkpoints(state_dir)[-1]
    assert size == 10
    check_checkpoint(note, vkey, state_dir)
    verify_ok("--state-dir", str(state_dir))


# --- inclusion proofs


def test_prove_seq_through_the_socket_verifies_offline(live: Live) -> None:
    head = live.settled_head()
    records = {}
    for seq in (0, 17, head - 1):
        proof = prove(live, "--seq", str(seq))
        found = verify_proof_ok(proof, live.vkey, seq)
        assert int(found.group(3)) >= seq + 1
        records[seq] = proof_extra(proof)
    with live.daemon.client() as client:
        for seq, extra in records.items():
            assert json.loads(extra) == client.get(seq=seq)["entry"]
            assert json.loads(extra)["seq"] == seq


def test_inclusion_proof_over_http_and_the_socket_op(live: Live) -> None:
    live.settled_head()
    status, headers, over_http = live.daemon.get("/v1/proof/inclusion?seq=5")
    assert status == 200, over_http
    assert headers["Content-Type"].startswith("text/plain"), headers
    verify_proof_ok(over_http, live.vkey, 5)

    with live.daemon.client() as client:
        answer = client.request({"op": "prove_inclusion", "seq": 6})
        action_id = client.get(seq=7)["entry"]["action_id"]
    assert answer["ok"] is True, answer
    assert answer["seq"] == 6 and answer["size"] >= 7, answer
    verify_proof_ok(answer["proof"].encode(), live.vkey, 6)

    status, _, by_action_id = live.daemon.get(f"/v1/proof/inclusion?action_id={action_id}")
    assert status == 200, by_action_id
    verify_proof_ok(by_action_id, live.vkey, 7)


def test_prove_action_id_verifies_offline(live: Live) -> None:
    live.settled_head()
    with live.daemon.client() as client:
        record = client.get(seq=11)
    action_id = record["entry"]["action_id"]
    proof = prove(live, "--action-id", action_id)
    verify_proof_ok(proof, live.vkey, 11)
    assert json.loads(proof_extra(proof)) == record["entry"]


def test_proof_of_an_unknown_entry_is_a_usage_error(live: Live) -> None:
    result = run_cli("prove", "--seq", "100000", "--socket", live.socket)
    assert result.returncode == 2, output_of(result)
    assert "Traceback" not in output_of(result)
    status, _, body = live.daemon.get("/v1/proof/inclusion?seq=100000")
    assert status == 404, body


def _flip(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def alter_proof_hash(lines: list[str]) -> None:
    at = next(i for i, line in enumerate(lines) if line.startswith("index ")) + 1
    assert lines[at], "the proof has no hash lines"
    lines[at] = base64.b64encode(_flip(base64.b64decode(lines[at]), 5)).decode()


def alter_extra(lines: list[str]) -> None:
    assert lines[1].startswith("extra ")
    entry = base64.b64decode(lines[1][len("extra "):])
    altered = entry.replace(b'"plan-9"', b'"plan-8"')
    assert altered != entry
    lines[1] = "extra " + base64.b64encode(altered).decode()


def alter_checkpoint_signature(lines: list[str]) -> None:
    at = max(i for i, line in enumerate(lines) if line.startswith("\u2014 "))
    prefix, encoded = lines[at].rsplit(" ", 1)
    raw = base64.b64decode(encoded)
    lines[at] = f"{prefix} {base64.b64encode(_flip(raw, 4 + 10)).decode()}"


def alter_index(lines: list[str]) -> None:
    at = next(i for i, line in enumerate(lines) if line.startswith("index "))
    lines[at] = "index 8"


@pytest.mark.parametrize(
    "alter",
    [alter_proof_hash, alter_extra, alter_checkpoint_signature, alter_index],
    ids=["proof-hash", "extra", "checkpoint-signature", "index"],
)
def test_an_altered_proof_does_not_verify(live: Live, alter: Callable[[list[str]], None]) -> None:
    live.settled_head()
    proof = prove(live, "--seq", "9")
    verify_proof_ok(proof, live.vkey, 9)
    lines = proof.decode().split("\n")
    alter(lines)
    altered = "\n".join(lines).encode()
    assert altered != proof
    proof_rejected(altered, live.vkey)


def test_a_proof_does_not_verify_under_another_key(live: Live, state_dir: Path) -> None:
    live.settled_head()
    proof = prove(live, "--seq", "3")
    other = DaemonProcess(state_dir).start()
    try:
        with other.client() as client:
            append_plans(client, 0, 1)
    finally:
        assert other.stop() == 0
    (other_vkey,) = vkeys(state_dir)
    assert other_vkey != live.vkey
    proof_rejected(proof, other_vkey)


# --- consistency proofs


def check_consistency(answer: dict[str, object], size1: int, size2: int) -> tuple[bytes, bytes]:
    assert set(answer) == CONSISTENCY_FIELDS, answer
    assert (answer["size1"], answer["size2"]) == (size1, size2), answer
    assert isinstance(answer["root1"], str) and isinstance(answer["root2"], str)
    assert isinstance(answer["proof"], list)
    root1 = base64.b64decode(answer["root1"], validate=True)
    root2 = base64.b64decode(answer["root2"], validate=True)
    proof = [base64.b64decode(h, validate=True) for h in answer["proof"]]
    verify_consistency(size1, size2, proof, root1, root2)
    if proof:
        with pytest.raises(ProofError):
            verify_consistency(size1, size2, [_flip(proof[0]), *proof[1:]], root1, root2)
    return root1, root2


def test_prove_consistency_json_verifies(live: Live) -> None:
    head = live.settled_head()
    result = run_cli("prove", "--consistency", "13", str(head), "--socket", live.socket)
    assert result.returncode == 0, output_of(result)
    root1, root2 = check_consistency(json.loads(result.stdout), 13, head)
    leaves = leaf_hashes(live.state_dir)
    assert root1 == tree_root(leaves[:13])
    assert root2 == tree_root(leaves[:head])

    status, _, body = live.daemon.get(f"/v1/proof/consistency?size1=21&size2={head}")
    assert status == 200, body
    check_consistency(json.loads(body), 21, head)


def test_consistency_between_a_saved_checkpoint_and_a_later_one(live: Live) -> None:
    vkey = VerifierKey.from_vkey(live.vkey)
    with live.daemon.client() as client:
        saved = verify_checkpoint(wait_for_checkpoint(client, client.ping()), [vkey])
        append_plans(client, 2000, 9)
        later = verify_checkpoint(wait_for_checkpoint(client, saved.size + 9), [vkey])
        answer = client.request({"op": "prove_consistency", "size1": saved.size, "size2": later.size})
    assert later.size > saved.size
    assert answer.pop("ok") is True, answer
    root1, root2 = check_consistency(answer, saved.size, later.size)
    # The roots the signed checkpoints carry, not only the ones the proof answer names.
    proof = [base64.b64decode(h) for h in answer["proof"]]
    verify_consistency(saved.size, later.size, proof, saved.root_hash, later.root_hash)
    assert (root1, root2) == (saved.root_hash, later.root_hash)


# --- signing mode "checkpoint"


def test_checkpoint_signing_mode(state_dir: Path) -> None:
    daemon = DaemonProcess(state_dir, env={**CHECKPOINT_MODE, **SHORT_INTERVAL}).start()
    try:
        with daemon.client() as client:
            seqs = [*append_plans(client, 0, 12), client.append({"action_type": "PlanStarted"})["seq"]]
            assert seqs == list(range(13))
            wait_for_checkpoint(client, 13)
            records = [client.get(seq=seq) for seq in seqs]
        assert all(record["signature"] is None for record in records), records
        (vkey,) = vkeys(state_dir)
        verify_proof_ok(prove(Live(daemon, vkey), "--seq", "4"), vkey, 4)
    finally:
        assert daemon.stop() == 0
    verify_ok("--state-dir", str(state_dir))
    with tempfile.TemporaryDirectory() as scratch:
        export = Path(scratch) / "export.ndjson"
        assert run_cli("export", "--state-dir", str(state_dir), "-o", str(export)).returncode == 0
        assert all(json.loads(line)["signature"] is None for line in export.read_text().splitlines())

    # Restarted with an hour's interval: entries after the latest checkpoint are pending.
    daemon = DaemonProcess(state_dir, env={**CHECKPOINT_MODE, **LONG_INTERVAL}).start()
    try:
        with daemon.client() as client:
            for i in range(4):
                append_plans(client, 100 + i, 1)
            covered = checkpoint_size(client)
            assert client.ping() == 17
        assert covered < 17, "an hour's interval, yet every entry is covered"
        result = run_cli("verify", "--state-dir", str(state_dir))
        if result.returncode != 0:
            assert result.returncode == 1, output_of(result)
            found = FAILED.search(output_of(result))
            assert found, output_of(result)
            assert (int(found.group(1)), found.group(2)) == (covered, "unauthenticated"), output_of(result)
        pending = verify_ok("--state-dir", str(state_dir), "--allow-pending")
        assert "not covered yet" in pending, pending
        uncovered = run_cli("prove", "--seq", "16", "--socket", str(daemon.socket_path))
        assert uncovered.returncode == 2, output_of(uncovered)
        assert "not covered" in output_of(uncovered)
    finally:
        assert daemon.stop() == 0
    assert stored_checkpoints(state_dir)[-1][0] == 17
    verify_ok("--state-dir", str(state_dir))
