"""The JSONL sink writes export records and rotates by size, keeping `keep` old files."""

from __future__ import annotations

import json
from pathlib import Path

from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.hashing import CHAIN_ROOT, Hash, chain_hash, leaf_hash
from ccos_obsd.ledger.keys import KeyId
from ccos_obsd.ledger.store import StoredEntry
from ccos_obsd.sinks.jsonl import JsonlSink


def entries(count: int, start: int = 0) -> list[StoredEntry]:
    out, previous = [], CHAIN_ROOT
    for seq in range(start, start + count):
        data = canonical_bytes({"action_type": "PlanStarted", "seq": seq, "pad": "x" * 200, "v": 1})
        leaf = leaf_hash(data)
        previous = chain_hash(previous, leaf)
        out.append(StoredEntry(seq, data, leaf, Hash(previous), KeyId("00000000"), b"\x00" * 64))
    return out


def seqs(path: Path) -> list[int]:
    return [json.loads(line)["seq"] for line in path.read_text().splitlines()]


def test_records_are_export_records(tmp_path: Path) -> None:
    sink = JsonlSink("file", tmp_path / "out.jsonl")
    sink.open()
    batch = entries(3)
    sink.deliver(batch)
    sink.close()
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert set(records[0]) == {"seq", "entry", "leaf_hash", "chain_hash", "key_id", "signature"}
    assert records[1]["entry"].encode() == batch[1].entry


def test_rotation_by_size_keeps_the_newest_files_and_loses_no_record(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = JsonlSink("file", path, max_bytes=4096, keep=2)
    sink.open()
    for start in range(0, 60, 5):
        sink.deliver(entries(5, start))
    sink.close()
    rotated = [path.with_name("out.jsonl.2"), path.with_name("out.jsonl.1"), path]
    assert all(p.exists() for p in rotated)
    assert not path.with_name("out.jsonl.3").exists()
    assert all(p.stat().st_size <= 4096 for p in rotated)
    kept = [seq for p in rotated for seq in seqs(p)]
    assert kept == list(range(kept[0], 60))  # contiguous up to the newest: only the oldest files went


def test_a_line_cut_by_a_crash_is_dropped_before_the_batch_is_written_again(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = JsonlSink("file", path)
    sink.open()
    sink.deliver(entries(3))
    sink.close()
    whole = path.read_bytes()
    with open(path, "ab") as handle:  # the next batch, killed half-way through its write
        handle.write(json.dumps(entries(1, start=3)[0].export_record()).encode()[:40])
    sink.open()
    sink.deliver(entries(2, start=3))  # the runner delivers from its cursor again
    sink.close()
    assert path.read_bytes().startswith(whole)
    assert seqs(path) == [0, 1, 2, 3, 4]


def test_a_file_of_one_cut_line_is_emptied(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"seq": 0, "ent')
    sink = JsonlSink("file", path)
    sink.open()
    sink.close()
    assert path.read_bytes() == b""
