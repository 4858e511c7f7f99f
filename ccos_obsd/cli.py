"""The ``ccos-obsd`` command line. The only place that turns errors into exit codes.

Exit codes: 0 ok; 1 verification found a problem (for ``send``: an answer was an
error); 2 usage or configuration error; 3 start-up failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from ccos_obsd import __version__
from ccos_obsd.client import Client
from ccos_obsd.config import ENV_CONFIG_FILE, Config, load_config, prepare_paths
from ccos_obsd.errors import (
    BackupError,
    ConfigError,
    KeyFormatError,
    NoteError,
    ProofError,
    RemoteError,
    StartupError,
    UsageError,
    VerificationError,
)
from ccos_obsd.ledger import store
from ccos_obsd.ledger.hashing import Hash
from ccos_obsd.ledger.keys import KeyId, VerifierKey
from ccos_obsd.ledger.note import verify_tlog_proof
from ccos_obsd.ledger.verify import CheckpointRecord, KeyRange, KeyRing, verify_entries
from ccos_obsd.systemd import PassedSockets, listen_fds

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3

# What add_subparsers returns: argparse has no public name for it.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"ccos-obsd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"ccos-obsd {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"ccos-obsd: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except (ConnectionError, FileNotFoundError, PermissionError) as exc:
        print(f"ccos-obsd {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccos-obsd",
        description="Causal Chain daemon: a durable, signed, verifiable ledger of agent actions.",
    )
    parser.add_argument("--version", action="version", version=f"ccos-obsd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --help lists the commands in this order.
    for add_command in (_add_run, _add_send, _add_export, _add_verify, _add_keys, _add_prove,
                        _add_wm, _add_replay, _add_backup, _add_query, _add_stats, _add_logs, _add_demo):
        add_command(commands)
    return parser


def _add_run(commands: Commands) -> None:
    run = commands.add_parser("run", help="run the daemon in the foreground",
                              description="Run the daemon in the foreground until SIGTERM or SIGINT. It "
                              "runs only on a private state dir: exit 3, naming the path, if group or others can "
                              "read or write it, or access its databases or key files.")
    _config_args(run)
    run.add_argument("--socket", metavar="PATH", help="Unix socket to listen on (socket.path)")
    run.add_argument("--http", metavar="HOST:PORT", help="address for /metrics and the read API (http.listen)")
    run.add_argument("--web-config", metavar="FILE",
                     help="Prometheus exporter-toolkit web configuration file: TLS, client certificates, "
                     "basic_auth_users (http.web_config). Without one, the routes that return ledger content "
                     "answer 401; /metrics, /healthz, /v1/checkpoint and /v1/proof/consistency stay open")
    run.add_argument("--log-level", metavar="LEVEL", help="log.level: debug, info, warning, error")
    run.add_argument("--start-despite-damage", action="store_true",
                     help="start even if the start-up self-check finds the ledger's tail or latest checkpoint "
                     "damaged; the finding is appended to the ledger as a SelfCheckFailed entry")
    run.set_defaults(func=cmd_run)


def _add_send(commands: Commands) -> None:
    send = commands.add_parser("send", help="send NDJSON actions or requests, print the answers",
                               description="Send each line of FILE (or stdin) as a request; a line without "
                               "\"op\" is an action to append. Prints one answer per line; exit 1 if any "
                               "answer is an error.")
    _config_args(send)
    _socket_arg(send)
    send.add_argument("files", nargs="*", metavar="FILE", help="NDJSON files ('-' or none: stdin)")
    send.set_defaults(func=cmd_send)


def _add_export(commands: Commands) -> None:
    export = commands.add_parser("export", help="print the ledger as export records (NDJSON)",
                                 description="Print one export record per entry (see docs/format.md). "
                                 "Reads the state dir read-only; works while the daemon runs.")
    _config_args(export)
    export.add_argument("--from", dest="start", type=int, default=0, metavar="SEQ", help="first seq")
    export.add_argument("--to", dest="stop", type=int, metavar="SEQ", help="last seq (inclusive)")
    export.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of stdout")
    export.set_defaults(func=cmd_export)


def _add_verify(commands: Commands) -> None:
    verify = commands.add_parser("verify", help="check every hash and signature",
                                 description="Recompute every leaf and chain hash and check every signature, "
                                 "from the state dir or an export file. Exit 0 when intact; exit 1 naming "
                                 "the first bad seq.")
    _config_args(verify)
    verify.add_argument("--export", type=Path, metavar="FILE", help="verify an export file instead ('-': stdin)")
    verify.add_argument("--vkey", action="append", default=[], metavar="KEY",
                        help="trusted verifier key (signed-note format); repeatable. "
                        "Default: the state dir's key ring")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    verify.add_argument("--since-checkpoint", action="append", default=[], type=Path, metavar="FILE",
                        help="a signed checkpoint saved earlier (trusted state): the ledger must extend it; "
                        "repeatable")
    verify.add_argument("--allow-pending", action="store_true",
                        help="accept unsigned entries after the latest checkpoint (checkpoint signing mode, "
                        "daemon running): they are hash-checked but not yet covered by a signature")
    verify.add_argument("--proof", type=Path, metavar="FILE",
                        help="check a tlog-proof (from `prove`) against the verifier keys, without the ledger")
    verify.set_defaults(func=cmd_verify)


def _add_keys(commands: Commands) -> None:
    keys = commands.add_parser("keys", help="print the verifier keys (signed-note vkeys)",
                               description="Print each key of the key ring as a signed-note verifier key, "
                               "one per line; --verbose adds the seq range each key signed.")
    _config_args(keys)
    _socket_arg(keys)
    keys.add_argument("action", nargs="?", choices=("list", "rotate"), default="list",
                      help="list (default): print the key ring; rotate: make a new signing key for new "
                      "entries (through the running daemon, or on a stopped state dir with --state-dir); "
                      "the rotation is itself an entry on the ledger")
    keys.add_argument("--verbose", "-v", action="store_true", help="also print each key's seq range")
    keys.set_defaults(func=cmd_keys)


def _add_prove(commands: Commands) -> None:
    prove = commands.add_parser("prove", help="print an inclusion or consistency proof",
                                description="Print a C2SP tlog-proof that an entry is in the log (with the "
                                "entry's bytes and the latest signed checkpoint: `verify --proof` checks it "
                                "offline), or an RFC 6962 consistency proof between two tree sizes as JSON. "
                                "Asks the running daemon, or reads --state-dir when given.")
    _config_args(prove)
    _socket_arg(prove)
    target = prove.add_mutually_exclusive_group(required=True)
    target.add_argument("--seq", type=int, metavar="N", help="the entry at seq N")
    target.add_argument("--action-id", metavar="ID", help="the entry with this action_id")
    target.add_argument("--consistency", type=int, nargs="+", metavar="SIZE",
                        help="OLD [NEW]: tree size OLD is a prefix of NEW (default: the current size)")
    prove.set_defaults(func=cmd_prove)


def _add_wm(commands: Commands) -> None:
    wm = commands.add_parser("wm", help="Working Memory: search it or print its digest",
                             description="Search Working Memory (one JSON object per entry, newest first) or "
                             "print its digest. Asks the running daemon, or reads --state-dir when given.")
    _config_args(wm)
    _socket_arg(wm)
    wm.add_argument("action", choices=("search", "digest"))
    wm.add_argument("text", nargs="?", help="words that must all occur (search)")
    wm.add_argument("--tags", help="comma-separated; an entry with any of them matches")
    wm.add_argument("--since", type=float, metavar="T", help="timestamp_s >= T (seconds)")
    wm.add_argument("--until", type=float, metavar="T", help="timestamp_s < T (seconds)")
    wm.add_argument("--plan", metavar="ID")
    wm.add_argument("--intent", metavar="ID")
    wm.add_argument("--session", metavar="ID")
    wm.add_argument("--limit", type=int, default=50, metavar="N")
    wm.set_defaults(func=cmd_wm)


def _add_replay(commands: Commands) -> None:
    replay = commands.add_parser("replay", help="rebuild Working Memory from the ledger",
                                 description="Replay the ledger into Working Memory through the WM sink's "
                                 "derivation (from scratch, or --from SEQ), keeping the budgets wm.max_entries / "
                                 "wm.max_tokens as the sink does, with a progress bar. Offline: the "
                                 "daemon must be stopped (the state dir is locked while it runs); with --socket the "
                                 "running daemon replays (its WM sink pauses meanwhile).")
    _config_args(replay)
    _socket_arg(replay)
    replay.add_argument("--from", dest="start", type=int, default=0, metavar="SEQ")
    replay.add_argument("--quiet", action="store_true", help="no progress bar")
    replay.set_defaults(func=cmd_replay)


def _add_backup(commands: Commands) -> None:
    backup = commands.add_parser("backup", help="a consistent copy of the state dir, also while the daemon runs",
                                 description="Copy the ledger and Working Memory (SQLite's online backup: one "
                                 "consistent snapshot each, also while the daemon writes) and the keys (signing.key, "
                                 "redact.key; mode 0600) into DEST, which must not exist or be an empty directory. "
                                 "Reads the state dir; with --socket the running daemon writes the copy instead "
                                 "(for users who cannot read the state dir; needs backup.allow_socket). Prints a "
                                 "JSON summary.")
    _config_args(backup)
    _socket_arg(backup)
    backup.add_argument("dest", type=Path, metavar="DEST", help="the directory to create (or an empty one)")
    backup.set_defaults(func=cmd_backup)


def _add_query(commands: Commands) -> None:
    query = commands.add_parser("query", help="query the ledger (NDJSON records)",
                                description="Print matching entries, oldest first (--desc: newest first; "
                                "--order time: by timestamp_ms, then seq, as CCOS orders a plan's execution "
                                "trace), from the running daemon, or read-only from --state-dir when given. "
                                "--run-id and --step-id also match the results of a matching call.")
    _config_args(query)
    _socket_arg(query)
    query.add_argument("--offline", action="store_true",
                       help="read the state dir instead of asking the daemon (implied by --state-dir)")
    for name in ("intent-id", "plan-id", "session-id", "action-type", "parent-action-id",
                 "function-name", "function-prefix", "run-id", "step-id"):
        query.add_argument(f"--{name}", metavar="VALUE")
    query.add_argument("--since-ms", type=int, metavar="MS", help="timestamp_ms >= MS")
    query.add_argument("--until-ms", type=int, metavar="MS", help="timestamp_ms < MS")
    query.add_argument("--after-seq", type=int, metavar="SEQ", help="page after this seq")
    query.add_argument("--limit", type=int, default=store.DEFAULT_QUERY_LIMIT, metavar="N")
    order = query.add_mutually_exclusive_group()
    order.add_argument("--order", choices=("asc", "desc", "time"), default="asc",
                       help="asc (default): by seq; desc: newest first; time: by timestamp_ms, then seq "
                       "(not with --after-seq)")
    order.add_argument("--desc", dest="order", action="store_const", const="desc", help="newest first (--order desc)")
    query.set_defaults(func=cmd_query)


def _add_stats(commands: Commands) -> None:
    stats = commands.add_parser("stats", help="calls, outcomes, durations and cost (JSON), from the running daemon",
                                description="Print the stats op's answer as JSON: entries, total cost, and per "
                                "capability and function the calls, successes, failures, cost and durations; "
                                "--plan-id / --intent-id add that plan's or intent's cost. Asks the running "
                                "daemon only (its aggregates live in its memory); --state-dir or --config only "
                                "say where its socket is.")
    _config_args(stats)
    _socket_arg(stats)
    for name in ("plan-id", "intent-id", "capability", "function"):
        stats.add_argument(f"--{name}", metavar="VALUE")
    stats.set_defaults(func=cmd_stats)


def _add_logs(commands: Commands) -> None:
    logs = commands.add_parser("logs", help="the daemon's recent log lines (NDJSON)",
                               description="Print the daemon's most recent log lines (its in-memory ring of "
                               "log.ring_size lines), one JSON object per line, oldest first. --follow then "
                               "keeps asking for the lines that follow and prints them as they come, until "
                               "Ctrl-C (exit 0); a line the ring dropped before it could be read is reported on "
                               "stderr. Asks the running daemon only.")
    _config_args(logs)
    _socket_arg(logs)
    logs.add_argument("-n", type=int, default=50, metavar="N", help="how many recent lines (default 50)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until interrupted")
    logs.set_defaults(func=cmd_logs)


def _add_demo(commands: Commands) -> None:
    demo = commands.add_parser("demo", help="send a realistic agent workload (for dashboards and trials)",
                               description="Append a simulated agent workload through the socket: sessions "
                               "with intents, plans, steps, capability calls (a dozen capabilities, skewed "
                               "latencies, costs, failures and retries), governance and budget events. Prints a "
                               "one-line summary at the end; exit 1 if any action was refused.")
    _config_args(demo)
    _socket_arg(demo)
    demo.add_argument("--rate", type=float, default=100.0, metavar="N", help="actions per second (default 100)")
    demo.add_argument("--duration", type=float, metavar="S", help="seconds to run (default: until Ctrl-C)")
    demo.add_argument("--seed", type=int, default=1, metavar="N", help="same seed, same workload (default 1)")
    demo.add_argument("--run-id", metavar="ID",
                      help="prefix of every id, and metadata.run_id (default: demo-<random>)")
    demo.set_defaults(func=cmd_demo)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help=f"TOML config file (default: ${ENV_CONFIG_FILE}, else embedded defaults)")
    parser.add_argument("--state-dir", metavar="DIR", help="state directory (state_dir)")


def _socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH", help="the daemon's socket (default: socket.path)")


def _load(args: argparse.Namespace, **flags: Any) -> Config:
    file = args.config
    if file is None and os.environ.get(ENV_CONFIG_FILE):
        file = Path(os.environ[ENV_CONFIG_FILE])
    overrides = {"state_dir": args.state_dir, **flags}
    return load_config(file, overrides=overrides)


# --- run


def cmd_run(args: argparse.Namespace) -> int:
    from ccos_obsd.daemon import Daemon
    from ccos_obsd.webconfig import read_web_config

    flags = {"socket.path": args.socket, "http.listen": args.http, "http.web_config": args.web_config,
             "log.level": args.log_level}
    config = read_web_config(_load(args, **flags))  # a bad web config: exit 2 before anything starts
    # Everything the daemon creates (ledger, key, lock) is private to its user;
    # the socket's mode is set explicitly after bind.
    os.umask(0o077)
    try:
        sockets = PassedSockets.from_fds(listen_fds())
    except (ValueError, OSError) as exc:
        raise StartupError(f"the sockets passed by the service manager: {exc}") from None
    # A socket passed by systemd lives in a directory systemd made and owns.
    prepare_paths(config, socket_dir=sockets.ingest is None)
    # A reload (SIGHUP) reads the configuration again the same way: same file, environment, flags.
    daemon = Daemon(config, start_despite_damage=args.start_despite_damage,
                    sockets=sockets, load_config=lambda: read_web_config(_load(args, **flags)))
    asyncio.run(daemon.run())
    return EXIT_OK


# --- talking to the daemon


def _connect(args: argparse.Namespace) -> Client:
    config = _load(args, **{"socket.path": args.socket})
    try:
        return Client(config.socket.path, timeout=None)
    except FileNotFoundError:
        raise ConnectionError(f"no daemon socket at {config.socket.path} (is the daemon running?)") from None
    except ConnectionRefusedError:
        raise ConnectionError(f"nothing listens on {config.socket.path} (is the daemon running?)") from None


def _input_lines(files: Sequence[str]) -> Iterator[bytes]:
    for name in files or ["-"]:
        if name == "-":
            yield from sys.stdin.buffer
        else:
            with open(name, "rb") as handle:
                yield from handle


def cmd_send(args: argparse.Namespace) -> int:
    failed = False
    out = sys.stdout
    with _connect(args) as client:
        for answer in client.pipeline(_input_lines(args.files)):
            failed = failed or not answer.get("ok")
            if "results" in answer:
                failed = failed or any(not r.get("ok") for r in answer["results"])
            out.write(json.dumps(answer, separators=(",", ":")) + "\n")
    out.flush()
    return EXIT_PROBLEM if failed else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    import secrets

    from ccos_obsd.demo import Workload, run_demo

    if not 0 < args.rate < float("inf"):
        raise UsageError("--rate must be a positive number")
    if args.duration is not None and not args.duration > 0:
        raise UsageError("--duration must be positive")
    workload = Workload(args.seed, args.run_id or f"demo-{secrets.token_hex(4)}")
    with _connect(args) as client:
        summary = run_demo(client, workload, rate=args.rate, duration_s=args.duration)
    print(summary.line())
    return EXIT_PROBLEM if summary.errors else EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    filters: dict[str, Any] = {}
    for name in ("intent_id", "plan_id", "session_id", "action_type", "parent_action_id",
                 "function_name", "function_prefix", "run_id", "step_id", "since_ms", "until_ms", "after_seq"):
        value = getattr(args, name)
        if value is not None:
            filters[name] = value
    filters["limit"] = args.limit
    if args.order != "asc":
        filters["order"] = args.order
    if args.offline or args.state_dir is not None:
        from ccos_obsd.errors import RequestError
        from ccos_obsd.ops import parse_entry_query

        try:
            query = parse_entry_query(filters)
        except RequestError as exc:
            raise UsageError(exc.message) from None
        conn = _open_ledger(args)
        try:
            records = [e.query_record() for e in store.query_entries(conn, query)]
        finally:
            conn.close()
    else:
        with _connect(args) as client:
            try:
                records = client.query(**filters)
            except RemoteError as exc:
                raise UsageError(exc.message) from None
    _print_ndjson(records)
    return EXIT_OK


def _print_ndjson(items: list[dict[str, Any]]) -> None:
    sys.stdout.write("".join(json.dumps(item, separators=(",", ":"), ensure_ascii=False) + "\n" for item in items))
    sys.stdout.flush()


def cmd_stats(args: argparse.Namespace) -> int:
    names = ("plan_id", "intent_id", "capability", "function")
    filters = {name: value for name in names if (value := getattr(args, name)) is not None}
    with _connect(args) as client:
        try:
            answer = client.stats(**filters)
        except RemoteError as exc:
            raise UsageError(exc.message) from None
    answer.pop("ok")
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    return EXIT_OK


FOLLOW_INTERVAL_S = 0.5
"""How often ``logs --follow`` asks for new lines when it has caught up."""
FOLLOW_PAGE = 1000
"""Most lines ``logs --follow`` asks for at once; a full page is followed by the next at once."""


def cmd_logs(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        answer = _read_logs(client, {"n": args.n})
        _print_ndjson(answer["lines"])
        if args.follow:
            with contextlib.suppress(KeyboardInterrupt):  # the way to stop following: not an error
                _follow_logs(client, answer["last"])
    return EXIT_OK


def _read_logs(client: Client, request: dict[str, Any]) -> dict[str, Any]:
    answer = client.request({"op": "logs", **request})
    if not answer.get("ok"):
        raise UsageError(RemoteError.from_answer(answer).message)
    return answer


def _follow_logs(client: Client, last: int) -> None:
    """Print the lines after line ``last`` as the daemon logs them, until interrupted.

    Lines are numbered by the daemon's ring, so a line is printed once even when
    others are identical to it; lines the ring dropped before they were read are
    counted on stderr.
    """
    while True:
        answer = _read_logs(client, {"n": FOLLOW_PAGE, "after": last})
        if answer["missed"]:
            print(f"ccos-obsd logs: {answer['missed']} lines were dropped from the daemon's ring before they "
                  "could be read (log.ring_size)", file=sys.stderr)
        _print_ndjson(answer["lines"])
        last = answer["last"]
        if len(answer["lines"]) < FOLLOW_PAGE:
            time.sleep(FOLLOW_INTERVAL_S)


def cmd_prove(args: argparse.Namespace) -> int:
    if args.consistency is not None and len(args.consistency) > 2:
        raise UsageError("--consistency takes OLD and optionally NEW")
    if args.state_dir is not None:
        answer = _prove_offline(args)
    else:
        with _connect(args) as client:
            if args.consistency is not None:
                request: dict[str, Any] = {"op": "prove_consistency", "size1": args.consistency[0]}
                if len(args.consistency) == 2:
                    request["size2"] = args.consistency[1]
            else:
                request = {"op": "prove_inclusion"}
                request.update({"seq": args.seq} if args.seq is not None else {"action_id": args.action_id})
            answer = client.request(request)
        if not answer.get("ok"):
            raise UsageError(RemoteError.from_answer(answer).message)
        answer.pop("ok")
    if args.consistency is not None:
        print(json.dumps(answer, indent=2))
    else:
        sys.stdout.write(answer["proof"])
    return EXIT_OK


def _prove_offline(args: argparse.Namespace) -> dict[str, Any]:
    from ccos_obsd.errors import RequestError, Unavailable
    from ccos_obsd.ledger import proofs
    from ccos_obsd.ledger.store import snapshot

    conn = _open_ledger(args)
    try:
        if args.consistency is not None:
            size2 = args.consistency[1] if len(args.consistency) == 2 else None
            return snapshot(conn, proofs.consistency, args.consistency[0], size2)
        return snapshot(conn, proofs.inclusion, seq=args.seq, action_id=args.action_id)
    except Unavailable as exc:
        print(f"ccos-obsd prove: {exc.message}", file=sys.stderr)
        raise SystemExit(EXIT_PROBLEM) from None
    except RequestError as exc:
        raise UsageError(exc.message) from None
    finally:
        conn.close()


def cmd_wm(args: argparse.Namespace) -> int:
    from ccos_obsd.config import default_wm_sink
    from ccos_obsd.errors import RequestError
    from ccos_obsd.ops import parse_wm_search
    from ccos_obsd.wm import store as wm_store

    filters: dict[str, Any] = {"limit": args.limit}
    for key, value in (("text", args.text), ("tags", args.tags), ("since", args.since), ("until", args.until),
                       ("plan_id", args.plan), ("intent_id", args.intent), ("session_id", args.session)):
        if value is not None:
            filters[key] = value
    if args.state_dir is not None:
        config = _load(args)
        path = (config.wm_sink or default_wm_sink(config.state_dir)).path
        try:
            if args.action == "digest":
                answer = wm_store.digest(path)
            else:
                answer = {"entries": wm_store.search(path, parse_wm_search(filters))}
        except RequestError as exc:
            raise UsageError(exc.message) from None
    else:
        with _connect(args) as client:
            answer = client.request({"op": "wm_digest"} if args.action == "digest" else {"op": "wm_search", **filters})
        if not answer.get("ok"):
            raise UsageError(RemoteError.from_answer(answer).message)
    if args.action == "digest":
        print(answer["digest"])
    else:
        for entry in answer["entries"]:
            sys.stdout.write(json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n")
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from ccos_obsd.config import default_wm_sink
    from ccos_obsd.statedir import state_dir_lock
    from ccos_obsd.wm.replay import rebuild
    from ccos_obsd.wm.store import Budgets

    if args.socket is not None:
        with _connect(args) as client, _RemoteProgress(args, _connect(args)) as progress:
            answer = client.request({"op": "replay", "from": args.start})
            progress.finish(answer.get("scanned_actions"))
        if not answer.get("ok"):
            raise UsageError(RemoteError.from_answer(answer).message)
        answer.pop("ok")
        print(json.dumps(answer))
        return EXIT_OK
    config = _load(args)
    sink = config.wm_sink or default_wm_sink(config.state_dir)
    db = store.ledger_path(config.state_dir)
    if not db.exists():
        raise UsageError(f"no ledger in {config.state_dir}")
    progress = _progress(args, "replay")
    os.umask(0o077)
    with state_dir_lock(config.state_dir):
        conn = store.connect(db, readonly=True)
        progress.total = max(0, store.read_head(conn).size - args.start)
        conn.close()
        budgets = Budgets.from_settings(config.wm.max_entries, config.wm.max_tokens)  # as the WM sink keeps them
        result = rebuild(db, sink.path, start=args.start, sink_name=sink.name, progress=progress.update,
                         budgets=budgets)
    progress.close()
    print(json.dumps({"mode": "replay", **result}))
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    from ccos_obsd.backup import backup_state_dir

    dest = Path(os.path.abspath(args.dest))
    if args.socket is not None:
        with _connect(args) as client:
            answer = client.request({"op": "backup", "dest": str(dest)})
        if not answer.get("ok"):
            raise UsageError(RemoteError.from_answer(answer).message)
        answer.pop("ok")
        summary = answer
    else:
        config = _load(args)
        os.umask(0o077)
        try:
            summary = backup_state_dir(config.state_dir, dest).to_json()
        except BackupError as exc:
            raise UsageError(exc.message) from None
    print(json.dumps(summary))
    return EXIT_OK


# --- reading the state dir


def _open_ledger(args: argparse.Namespace) -> Any:
    config = _load(args)
    path = store.ledger_path(config.state_dir)
    if not path.exists():
        raise UsageError(f"no ledger in {config.state_dir} (give --state-dir)")
    return store.connect(path, readonly=True)


def cmd_export(args: argparse.Namespace) -> int:
    conn = _open_ledger(args)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        conn.execute("BEGIN")  # one snapshot, even while the daemon appends
        stop = None if args.stop is None else args.stop + 1
        for entry in store.iter_entries(conn, args.start, stop):
            out.write(entry.export_line() + "\n")
        conn.execute("COMMIT")
    finally:
        conn.close()
        if args.output:
            out.close()
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    if args.action == "rotate":
        return _rotate_key(args)
    conn = _open_ledger(args)
    try:
        for key, first, last in store.read_keys(conn):
            if args.verbose:
                span = f"{first}..{'' if last is None else last}"
                print(f"{key.vkey()}\t{span}")
            else:
                print(key.vkey())
    finally:
        conn.close()
    return EXIT_OK


def _rotate_key(args: argparse.Namespace) -> int:
    if args.state_dir is not None and args.socket is None:
        answer = _rotate_offline(_load(args))
    else:
        with _connect(args) as client:
            answer = client.request({"op": "rotate_key"})
        if not answer.get("ok"):
            raise UsageError(RemoteError.from_answer(answer).message)
    print(f"rotated at seq {answer['seq']}; new key: {answer['vkey']}")
    return EXIT_OK


def _rotate_offline(config: Config) -> dict[str, Any]:
    """Rotate on a stopped daemon's state dir, through the same writer code path."""
    from ccos_obsd.ledger.keys import load_or_create_signing_key
    from ccos_obsd.ledger.writer import AppendResult, LedgerWriter
    from ccos_obsd.statedir import key_path, state_dir_lock

    if not store.ledger_path(config.state_dir).exists():
        raise UsageError(f"no ledger in {config.state_dir}")

    async def rotate() -> dict[str, Any]:
        path = key_path(config.state_dir)
        key, _ = load_or_create_signing_key(path, config.signing.key_name or "ccos-obsd")
        writer = LedgerWriter(
            store.ledger_path(config.state_dir), key, asyncio.get_running_loop(),
            signing_mode=config.signing.mode, key_path=path,
        )
        writer.start()
        try:
            outcome = await writer.rotate_key(None)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, writer.close)
        if not isinstance(outcome, AppendResult):
            raise UsageError(outcome.message)
        return {**outcome.to_wire(), "vkey": writer.key.verifier.vkey()}

    from ccos_obsd.log import LogRing, configure_logging

    configure_logging("warning", LogRing(16), sys.stderr)  # stdout carries the answer only
    os.umask(0o077)
    with state_dir_lock(config.state_dir):
        return asyncio.run(rotate())


def cmd_verify(args: argparse.Namespace) -> int:
    ring = _key_ring(args)
    if args.proof is not None:
        return _verify_proof(args.proof, ring)
    trusted = [
        CheckpointRecord(_read_text(path), source=f"--since-checkpoint {path}") for path in args.since_checkpoint
    ]
    progress = _progress(args)
    try:
        if args.export is not None:
            report = verify_entries(
                _export_entries(args.export), ring, progress=progress.update,
                checkpoints=trusted, allow_pending=args.allow_pending,
            )
        else:
            conn = _open_ledger(args)
            try:
                conn.execute("BEGIN")  # one snapshot, even while the daemon appends
                progress.total = store.read_head(conn).size
                stored = [CheckpointRecord(c.note, size=c.size) for c in store.read_checkpoints(conn)]
                report = verify_entries(
                    store.iter_entries(conn), ring, progress=progress.update,
                    checkpoints=stored + trusted, allow_pending=args.allow_pending,
                )
            finally:
                conn.close()
    except VerificationError as error:
        progress.close()
        print(f"FAILED: {error}", file=sys.stdout)
        return EXIT_PROBLEM
    progress.close()
    line = (f"ok: {report.entries} entries, {report.signatures_checked} signatures, "
            f"{report.checkpoints_checked} checkpoints (latest covers {report.covered_size}), "
            f"chain head {report.head_chain_hash.hex()}")
    if report.pending:
        line += f"; {report.pending} entries after the latest checkpoint are not covered yet"
    print(line)
    return EXIT_OK


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None


def _verify_proof(path: Path, ring: KeyRing) -> int:
    text = sys.stdin.read() if str(path) == "-" else _read_text(path)
    try:
        index, entry, checkpoint = verify_tlog_proof(text, ring.all_keys())
    except (NoteError, ProofError) as exc:
        print(f"FAILED: {exc}")
        return EXIT_PROBLEM
    print(f"ok: entry {index} is in the log {checkpoint.origin} of size {checkpoint.size} "
          f"(root {base64.b64encode(checkpoint.root_hash).decode()}); entry sha256 {hashlib.sha256(entry).hexdigest()}")
    return EXIT_OK


def _key_ring(args: argparse.Namespace) -> KeyRing:
    if args.vkey:
        try:
            return KeyRing(KeyRange(VerifierKey.from_vkey(v)) for v in args.vkey)
        except KeyFormatError as exc:
            raise UsageError(f"--vkey: {exc}") from None
    if (args.export is not None or args.proof is not None) and args.state_dir is None and args.config is None:
        raise UsageError("verifying without the ledger needs the signer's keys: --vkey KEY or --state-dir DIR")
    conn = _open_ledger(args)
    try:
        return KeyRing(KeyRange(key, first, last) for key, first, last in store.read_keys(conn))
    finally:
        conn.close()


def _export_entries(path: Path) -> Iterator[store.StoredEntry]:
    handle = sys.stdin if str(path) == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    try:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            yield _parse_export_record(line, number)
    finally:
        if handle is not sys.stdin:
            handle.close()


def _parse_export_record(line: str, number: int) -> store.StoredEntry:
    try:
        record = json.loads(line)
        signature = record["signature"]
        return store.StoredEntry(
            seq=int(record["seq"]),
            entry=record["entry"].encode("utf-8"),
            leaf_hash=Hash(bytes.fromhex(record["leaf_hash"])),
            chain_hash=Hash(bytes.fromhex(record["chain_hash"])),
            key_id=KeyId(record["key_id"]),
            signature=None if signature is None else base64.b64decode(signature, validate=True),
        )
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        seq = _guess_seq(line, number - 1)
        raise VerificationError(seq, "malformed_record", f"line {number} is not an export record: {exc}") from None


def _guess_seq(line: str, fallback: int) -> int:
    try:
        return int(json.loads(line)["seq"])
    except (ValueError, KeyError, TypeError):
        return fallback


class _NoProgress:
    total: int | None = None

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(args: argparse.Namespace, desc: str = "verify") -> Any:
    if args.quiet or not sys.stderr.isatty():
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(unit=" entries", unit_scale=True, file=sys.stderr, desc=desc)


class _RemoteProgress:
    """A progress bar for work the daemon does: polls ``replay_status`` on a second connection."""

    def __init__(self, args: argparse.Namespace, client: Client, interval_s: float = 0.2) -> None:
        self._bar = _progress(args, "replay")
        self._client = client
        self._interval_s = interval_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _RemoteProgress:
        if not isinstance(self._bar, _NoProgress):
            self._thread.start()
        return self

    def finish(self, done: int | None) -> None:
        """The replay answered: stop polling and show its final count."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        if isinstance(done, int) and not isinstance(self._bar, _NoProgress):
            self._bar.total = max(done, self._bar.total or 0)
            self._bar.update(done - self._bar.n)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        self._bar.close()
        self._client.close()

    def _poll(self) -> None:
        while not self._done.wait(self._interval_s):
            try:
                status = self._client.request({"op": "replay_status"})
            except (OSError, ValueError):
                return
            if status.get("running"):
                self._bar.total = status["total"]
                self._bar.update(status["done"] - self._bar.n)


def entrypoint() -> NoReturn:
    sys.exit(main())
