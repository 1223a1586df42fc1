"""securecc-audit: the auditor's tool.  Read-only; needs the log files and the public key, never the server.

  securecc-audit verify --key audit.key.pub LOG...       the chain, order and signatures; exit 1 at the first problem
  securecc-audit show LOG... [filters] [--json]          records as a table (or JSON lines for jq)
  securecc-audit stats LOG... [filters]                  jobs, refusals by reason, top principals, bytes, time
  securecc-audit show --follow LOG                       a live log, as it grows
  securecc-audit provenance OBJECT... [--dir DIR] [--signing-key PUB] [--log LOG... --key KEY]
                                                         who compiled each object, where, when, with what;
                                                         with the log, whether it holds that job's record

Names in a record are the client's choice: the table, stats and verify's messages print them through
:func:`visible`, so a file name cannot move the cursor, erase a row or print a forged one.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from securecc import attest
from securecc.audit import key_id, line_hash, load_public_key, read_lines, records, verify


def visible(value: object) -> str:
    """``str(value)`` with every character a terminal could act on escaped as Python would (``\\x1b``, ``\\r``,
    ``\\u202e``, ``\\udcff``): C0, DEL, C1, separators, bidi and other format controls, lone surrogates.
    The backslash too, so an escape printed is never a name's own text."""
    text = str(value)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode() for c in text)


def _json(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=True)  # ASCII: control characters and surrogates stay JSON escapes


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logs", nargs="+", type=Path, help="the log and its rotated files, in any order")
    parser.add_argument("--principal")
    parser.add_argument("--decision", choices=["allowed", "refused"])
    parser.add_argument("--reason")
    parser.add_argument("--compiler")
    parser.add_argument("--host", help="the server that wrote the record")
    parser.add_argument("--since", help="RFC 3339 time or date, e.g. 2026-11-25 or 2026-11-25T10:00")
    parser.add_argument("--until")
    parser.add_argument("--all", action="store_true", help="server events and checkpoints too, not only jobs")


def _matches(record: dict[str, Any], options: argparse.Namespace) -> bool:
    if not options.all and record.get("event") not in ("job", "auth"):
        return False
    for name in ("principal", "decision", "reason", "compiler"):
        wanted = getattr(options, name)
        if wanted is not None and record.get(name) != wanted:
            return False
    if options.host and record.get("server") != options.host:
        return False
    stamp = str(record.get("time", ""))
    return (not options.since or stamp >= options.since) and (not options.until or stamp < options.until)


def _selected(options: argparse.Namespace) -> Iterator[dict[str, Any]]:
    return (r for r in records(options.logs) if _matches(r, options))


def _row(r: dict[str, Any]) -> str:
    status = r.get("ended_by") or ("-" if r.get("exit_status") is None else r["exit_status"])
    return (f"{visible(r.get('time', '')):24}  {visible(r.get('principal', '-')):22}  {visible(r.get('event', '')):6}  "
            f"{visible(r.get('decision', '-')):8}  {visible(r.get('reason', '-')):24}  "
            f"{visible(r.get('source', '-')):24}  {visible(status)}")


VERIFY_LIMITS = """\
It fails at a record edited, inserted, reordered or deleted, a forged signature, a log whose head was
removed (it must start at seq 0, or at the rotation record opening a file once older ones are retired),
and, without --live, a log ending with records after its last checkpoint (cut, or its server died).

It cannot detect, because no signature covers what is missing:
  - a cut that leaves the log ending with a checkpoint: the records after any checkpoint, or the newest
    files removed whole (a rotated file ends with one); with --live, any cut of the unsigned tail;
  - the oldest rotated files removed whole (retention): OK says where the chain starts;
  - every file removed or emptied.
A later checkpoint kept off the box (audit.syslog) shows the first two.
"""

HEADER = f"{'time (UTC)':24}  {'principal':22}  {'event':6}  {'decision':8}  {'reason':24}  {'source':24}  exit"


def _follow(path: Path, options: argparse.Namespace) -> None:
    with open(path, "rb") as f:
        f.seek(0, 2)
        buffer = b""
        while True:
            chunk = f.read()
            if not chunk:
                time.sleep(0.5)
                continue
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and _matches(record, options):
                    print(_json(record) if options.json else _row(record), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="securecc-audit", description="Verify and query securecc audit logs.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check the chain and the signed checkpoints", epilog=VERIFY_LIMITS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("--key", type=Path, required=True, action="append",
                       help="the server's public key (audit.key.pub); repeat for a log spanning a key rotation")
    check.add_argument("--live", action="store_true", help="the log is being written: an unsigned tail is expected")
    check.add_argument("logs", nargs="+", type=Path)
    show = commands.add_parser("show", help="records as a table")
    _filters(show)
    show.add_argument("--json", action="store_true", help="one JSON record per line, for jq")
    show.add_argument("--follow", action="store_true", help="watch the (last given) log grow")
    stats = commands.add_parser("stats", help="totals")
    _filters(stats)
    origin = commands.add_parser("provenance", help="where objects came from, checked against the servers' signatures")
    origin.add_argument("objects", nargs="+", type=Path)
    origin.add_argument("--dir", type=Path, default=os.environ.get("SECURECC_PROVENANCE"),
                        help="where the client wrote the statements (default $SECURECC_PROVENANCE)")
    origin.add_argument("--log", type=Path, action="append", default=[], help="the server's audit log and rotated files")
    origin.add_argument("--key", type=Path, action="append", default=[], help="the log's public key (audit.key.pub): verify it first")
    origin.add_argument("--signing-key", type=Path, action="append", default=[],
                        help="a server's result key (signing.key.pub): the serving statement must be signed by one given")
    options = parser.parse_args(argv)
    try:
        if options.command == "verify":
            report = verify(options.logs, [load_public_key(k) for k in options.key], options.live)
            if not report.ok:
                print(f"securecc-audit: FAILED: {visible(report.problem)}")
                sys.exit(1)
            tail = f", {report.unsigned_tail} record(s) after the last checkpoint" if report.unsigned_tail else ""
            start = f", starts at seq {report.first_seq} (the older rotated files not given)" if report.first_seq else ""
            full = f", stopped {report.full_disk_stops} time(s) on a full disk" if report.full_disk_stops else ""
            lost = f"; {report.lost} record(s) lost while the log could not be written" if report.lost else ""
            print(f"OK: {report.records} records, {report.checkpoints} signed checkpoints, {report.files} file(s)"
                  f"{start}{tail}{full}{lost}")
        elif options.command == "show":
            if options.follow:
                _follow(options.logs[-1], options)
            if not options.json:
                print(HEADER)
            for record in _selected(options):
                print(_json(record) if options.json else _row(record))
        elif options.command == "provenance":
            sys.exit(_provenance(options))
        else:
            _stats(list(_selected(options)))
    except (OSError, ValueError) as e:
        sys.exit(f"securecc-audit: {visible(e)}")
    except KeyboardInterrupt:
        sys.exit(130)


def _stats(selected: list[dict[str, Any]]) -> None:
    jobs = [r for r in selected if r.get("event") == "job"]
    refused = collections.Counter(r.get("reason") for r in jobs if r.get("decision") == "refused")
    principals = collections.Counter(r.get("principal") for r in jobs)
    print(f"jobs: {len(jobs)}  allowed: {sum(r.get('decision') == 'allowed' for r in jobs)}  "
          f"refused: {sum(refused.values())}  failed: {sum(bool(r.get('exit_status')) for r in jobs)}  "
          f"killed: {sum(bool(r.get('ended_by')) for r in jobs)}")
    print(f"bytes in: {sum(r.get('bytes_in', 0) for r in jobs)}  out: {sum(r.get('bytes_out', 0) or 0 for r in jobs)}  "
          f"compile time: {sum(r.get('duration', 0) for r in jobs):.1f} s")
    if refused:
        print("refusals by reason: " + ", ".join(f"{visible(reason)} {n}" for reason, n in refused.most_common()))
    if principals:
        print("top principals: " + ", ".join(f"{visible(p)} {n}" for p, n in principals.most_common(10)))


def _provenance(options: argparse.Namespace) -> int:
    """One line per object: who, where, when, with what, and whether the given log holds the job's record; 1 if any
    object has no statement, or one that does not check."""
    if options.dir is None:
        raise ValueError("say where the statements are: --dir DIR or SECURECC_PROVENANCE")
    logged: dict[int, tuple[str, dict[str, Any]]] = {}
    if options.log:
        if options.key:
            report = verify(options.log, [load_public_key(k) for k in options.key], live=True)
            if not report.ok:
                print(f"securecc-audit: the log does not verify: {visible(report.problem)}")
                return 1
        logged = {line.record["seq"]: (line_hash(line.raw), line.record) for line in read_lines(options.log)
                  if line.record is not None and isinstance(line.record.get("seq"), int)}
    anchors = {attest.public_key(load_public_key(k)) for k in options.signing_key}
    failed = 0
    for path in options.objects:
        data = path.read_bytes()
        statement = options.dir / (hashlib.sha256(data).hexdigest() + ".json")
        try:
            facts = attest.check_provenance(json.loads(statement.read_bytes()), data)
        except FileNotFoundError:
            print(f"{visible(path)}: no provenance in {visible(options.dir)}: compiled locally, or without SECURECC_PROVENANCE")
            failed += 1
            continue
        except (ValueError, attest.BadAttestation) as e:
            print(f"{visible(path)}: FAILED: {visible(e)}")
            failed += 1
            continue
        first = facts[0]
        if anchors and first["key"] not in anchors:  # without them, a statement is as good as the key it carries
            print(f"{visible(path)}: FAILED: signed by key {_key_name(first['key'])}, not one given with --signing-key")
            failed += 1
            continue
        said = (f"{visible(path)}: compiled by {visible(first['server'])} (job {visible(first['job_id'])}) at {visible(first['time'])} "
                f"with {visible(first['compiler_identity'])}, signed by key {_key_name(first['key'])}")
        said += "".join(f"; served from the cache of {visible(f['server'])}'s job {visible(f['job_id'])}" for f in facts[1:])
        if options.log:
            seq, digest = first["audit"]["seq"], first["audit"]["line_sha256"]
            found = logged.get(seq)
            if found is None or found[0] != digest or found[1].get("job_id") != first["job_id"]:
                print(f"{said}; FAILED: its audit record (seq {visible(seq)}) is not in the log given")
                failed += 1
                continue
            if first["outputs"].get("object") != found[1].get("output_sha256"):  # a statement naming a real record, by any key
                print(f"{said}; FAILED: its audit record (seq {visible(seq)}) names another object")
                failed += 1
                continue
            checked = "verified" if options.key else "not verified: give --key"
            said += f"; its audit record, seq {visible(seq)}, is in the log ({checked}): for {visible(found[1].get('principal'))}"
        print(said)
    return 1 if failed else 0


def _key_name(key: str) -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return key_id(Ed25519PublicKey.from_public_bytes(base64.b64decode(key)))
