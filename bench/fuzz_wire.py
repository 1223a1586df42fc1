#!/usr/bin/env python3
"""Wire fuzzing at volume: mutated inputs through securecc's protocol parser and the distcc parser.

Not a test: `.venv/bin/python bench/fuzz_wire.py [--count 1000000] [--seed N] [--jobs 2]`.

``--count`` inputs go to each parser (default a million each), spread over ``--jobs``
processes (default: every core).  Inputs are valid frames, messages and requests built
with ``random`` (no hypothesis: this has to be fast), then mutated: length fields set to
their boundaries or junk, bytes flipped, ranges deleted, duplicated or spliced in from
another input, truncations; each is fed in 1-4 random pieces.  The contract checked is
tests/unit/test_fuzz_wire.py's: events/values or the parser's own error, never another
exception, never more buffered than the caps allow, no input slower than ``--slow`` s.
Any break is a crash: saved as JSON (seed, worker, index, parameters, the input in hex
and as a repr, the traceback) under ``--crash-dir``, and the exit status is 1.
``--replay FILE`` runs one saved input again and prints its traceback.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from securecc import protocol as wire  # noqa: E402
from securecc.server import distcc_wire as distcc  # noqa: E402

CHUNK, MAX_FRAME = wire.CHUNK, wire.MAX_FRAME
PREAUTH_FRAME = getattr(wire, "MAX_HANDSHAKE_FRAME", MAX_FRAME)  # the pre-handshake cap, where there is one
DEFER = hasattr(wire, "PackedMessageReceived")
TEXT = "abc-_/.= \"\\\n\x00é\u00ff中\U0001f600\udcff\ud800"  # lone surrogates included: JSON must carry them
LIMITS = [0, 1, 2, 3, 12, 100, CHUNK - 1, CHUNK, CHUNK + 1, PREAUTH_FRAME, PREAUTH_FRAME + 1, MAX_FRAME, MAX_FRAME + 1,
          wire.MAX_HEADER, wire.MAX_HEADER + 1, distcc.MAX_TOKEN + 1, distcc.MAX_ARG + 1, 2**31, 2**32 - 1]
JSON_JUNK = [b"-1", b"0", b"1e400", b"99999999999999999999", b"null", b"true", b'"x"', b"[]", b"{}", b"[[[[[[", b"1.5"]
_NUMBER = re.compile(rb"-?\d+")
_DISTCC_ITEM = re.compile(rb"(?:TLEN|DIST|ARGC|ARGV|DOTI)[0-9a-f]{8}")


def identity(data: bytes) -> bytes:
    return data


class Crash(Exception):
    """An invariant broke (not an exception from the parser itself)."""


# --- building valid inputs --------------------------------------------------


def text(rng: random.Random) -> str:
    return "".join(rng.choice(TEXT) for _ in range(rng.choice((0, 1, 3, 8, 24))))


def blob(rng: random.Random, big: bool = False) -> bytes:
    size = rng.choice((CHUNK - 100, CHUNK, CHUNK + 50, 2 * CHUNK + 7)) if big else rng.choice((0, 1, 7, 100, 700, 3000, 9000))
    if rng.random() < 0.5:
        return rng.randbytes(size)
    return (rng.randbytes(rng.randint(1, 16)) * (size // 2 + 1))[:size]  # compressible: sealed with zstd


def message(rng: random.Random, big: bool = False) -> wire.Message:
    kind = rng.randrange(7)
    if kind == 0:
        paths = [text(rng) for _ in range(rng.randrange(3))]
        return wire.Job(text(rng), [text(rng) for _ in range(rng.randrange(4))], text(rng), text(rng), text(rng), text(rng),
                        blob(rng, big), blob(rng), {text(rng): text(rng) for _ in range(rng.randrange(3))}, text(rng),
                        paths, [blob(rng) for _ in paths])
    if kind == 1:
        return wire.Result(rng.randint(-300, 300), blob(rng), blob(rng), None if rng.random() < 0.2 else blob(rng, big), text(rng))
    if kind == 2:
        return wire.Refused(text(rng), text(rng), text(rng))
    if kind == 3:
        return wire.Busy(text(rng), rng.randint(-5, 2**40), rng.randint(-5, 2**40))
    if kind == 4:
        return wire.Alive(rng.choice((0, 1.5, -0.0, 1e308, float("inf"), rng.random())))
    if kind == 5:
        return wire.StatusRequest(rng.random() < 0.5)
    return wire.Status(text(rng))


def frames(parts: list[tuple[int, bytes]]) -> tuple[bytes, list[int]]:
    """Frames (unchecked: a payload may exceed a cap) and the offsets of their length fields."""
    out, offsets = bytearray(), []
    for kind, payload in parts:
        offsets.append(len(out))
        out += (len(payload) + 1).to_bytes(4, "big") + bytes([kind]) + payload
    return bytes(out), offsets


class Base:
    """One valid input and what mutating it needs: where its length fields are, its parameters."""

    def __init__(self, family: str, data: bytes, lengths: list[tuple[int, int]], **params: Any) -> None:
        self.family, self.data, self.lengths, self.params = family, data, lengths, params  # lengths: (offset, width)


def protocol_base(rng: random.Random) -> Base:
    family = rng.choice(("message", "handshake", "sealed", "sealed"))
    if family == "message":
        data = wire.encode_message(message(rng))
        return Base(family, data, [(1, 4)])
    if family == "handshake":
        parts = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice((wire.Kind.HELLO, wire.Kind.TOKEN, wire.Kind.ERROR, wire.Kind.ERROR, rng.randrange(256)))
            if kind == wire.Kind.HELLO:
                payload = wire.MAGIC + bytes([rng.randrange(4), rng.randrange(4)])
            elif kind == wire.Kind.ERROR:
                body: Any = rng.choice(({"reason": text(rng), "message": text(rng)}, {"reason": [text(rng)], "message": None},
                                        [1, 2], "x", {"reason": 1}, "[" * rng.randint(1, 3000)))
                payload = body.encode() if isinstance(body, str) and body.startswith("[") else json.dumps(body).encode()
            else:
                payload = rng.randbytes(rng.choice((0, 1, 50, 700)))
            parts.append((kind, payload))
        data, offsets = frames(parts)
        return Base(family, data, [(o, 4) for o in offsets])
    sender = wire.Connection()
    sender.secure(identity, identity)
    sent = [message(rng, big=rng.random() < 0.01) for _ in range(rng.randint(1, 2))]
    data = b"".join(sender.seal(m) for m in sent)
    offsets, pos = [], 0
    while pos + 5 <= len(data):
        offsets.append(pos)
        pos += 4 + int.from_bytes(data[pos : pos + 4], "big")
    size = len(wire.encode_message(sent[0]))
    max_message = rng.choice((wire.MAX_MESSAGE, size, size - 1, 100, CHUNK, 0))
    return Base(family, data, [(o, 4) for o in offsets], max_message=max_message, defer=DEFER and rng.random() < 0.5)


def distcc_base(rng: random.Random) -> Base:
    version = rng.choice((1, 2))
    tokens = [rng.randbytes(rng.choice((1, 20, 700))) for _ in range(rng.randrange(3))]
    argv = [rng.choice((b"gcc", b"-c", b"x.c", b"-o", b"x.o", b"\xff\xfe", rng.randbytes(rng.randrange(40)))) for _ in range(rng.randrange(6))]
    source = blob(rng)
    body = distcc.lzo_compress(source) if version == 2 else source
    data = b"".join([b"*", *(distcc.item(b"TLEN", len(t), t) for t in tokens), distcc.item(b"DIST", version),
                     distcc.item(b"ARGC", len(argv)), *(distcc.item(b"ARGV", len(a), a) for a in argv),
                     distcc.item(b"DOTI", len(body), body)])
    need = len(source) + sum(map(len, argv)) + len(body)
    max_input = rng.choice((need, need - 1, len(body) + sum(map(len, argv)), 0, 100, 1 << 20, 128 << 20))
    lengths = [(m.start() + 4, 8) for m in _DISTCC_ITEM.finditer(data)]
    return Base("request", data, lengths, max_input=max(max_input, 0), tokens=len(tokens))


# --- mutating ---------------------------------------------------------------


def mutate(rng: random.Random, base: Base, other: Base) -> bytes:
    """Fields first (their offsets are those of the valid input), then bytes."""
    data = bytearray(base.data)
    if base.family == "message" and rng.random() < 0.3:  # a number in the JSON header: a blob length, a load...
        end = 5 + int.from_bytes(data[1:5], "big")
        numbers = list(_NUMBER.finditer(data, 5, end))
        if numbers:
            m, junk = rng.choice(numbers), rng.choice(JSON_JUNK)
            data[m.start() : m.end()] = junk
            data[1:5] = (end - 5 + len(junk) - (m.end() - m.start())).to_bytes(4, "big")
    for _ in range(rng.choice((0, 0, 1, 1, 2))):
        if not base.lengths:
            break
        at, width = rng.choice(base.lengths)
        value = rng.choice(LIMITS) if rng.random() < 0.7 else rng.randrange(2**32)
        if rng.random() < 0.5:  # off by a little from the true value
            value = max(0, int.from_bytes(data[at : at + 4], "big") + rng.randint(-2, 2)) if width == 4 else value
        if width == 4:
            data[at : at + 4] = (value % 2**32).to_bytes(4, "big")
        else:
            data[at : at + 8] = rng.choice((b"%08x" % (value % 2**32), b"%08X" % (value % 2**32), b"-0000001", b" 0000001", b"0x000010"))
    for _ in range(rng.choice((0, 1, 1, 2, 3, 4))):
        op, n = rng.randrange(8), len(data)
        at = rng.randrange(n + 1)
        if op == 0 and n:
            data[at % n] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            data[at % n] = rng.randrange(256)
        elif op == 2:
            del data[at:]
        elif op == 3:
            del data[at : at + rng.choice((1, 2, 4, 12, 100))]
        elif op == 4:
            data[at:at] = rng.randbytes(rng.choice((1, 2, 4, 12)))
        elif op == 5:
            data[at:at] = data[at : at + rng.choice((1, 5, 12, 64))]
        elif op == 6:
            start = rng.randrange(len(other.data) + 1)
            data[at:at] = other.data[start : start + rng.choice((1, 12, 64, 500))]
        elif op == 7 and n:
            data[at % n : at % n + 1] = rng.choice((b"\0" * 8, b"\xff" * 4, b"[" * 64))
    return bytes(data)


def pieces(rng: random.Random, data: bytes) -> list[int]:
    return sorted(rng.randrange(len(data) + 1) for _ in range(rng.choice((0, 0, 1, 2, 3))))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


# --- running one input ------------------------------------------------------


def run_protocol(family: str, data: bytes, points: list[int], params: dict[str, Any]) -> str:
    """The outcome of one input: "events", "incomplete" or "ProtocolError"; Crash or any other exception is a crash."""
    if family == "message":
        try:
            wire.decode_message(data)
        except wire.ProtocolError:
            return "ProtocolError"
        return "events"
    max_message = params.get("max_message", wire.MAX_MESSAGE)
    conn = wire.Connection(max_message, **({"defer_unpack": True} if params.get("defer") else {}))
    if family == "sealed":
        conn.secure(identity, identity)
    cap = MAX_FRAME if conn.is_secure else PREAUTH_FRAME
    got = 0
    try:
        for piece in cut(data, points):
            for event in conn.receive_data(piece):
                if DEFER and isinstance(event, wire.PackedMessageReceived):
                    event = wire.unpack_message(event)
                got += 1
            if len(conn._buffer) >= 5 + cap or conn._chunked > max_message:
                raise Crash(f"buffered {len(conn._buffer)} bytes (cap {cap}), {conn._chunked} of chunks (cap {max_message})")
    except wire.ProtocolError:
        return "ProtocolError"
    return "events" if got else "incomplete"


def run_distcc(family: str, data: bytes, points: list[int], params: dict[str, Any]) -> str:
    """The outcome of one input, driven as the server does: "request", "incomplete" or "DistccError"."""
    max_input, tokens = params["max_input"], params["tokens"]
    parser, state, seen = distcc.Parser(max_input), "star", 0
    cap = 1 + 12 + distcc.MAX_TOKEN + 12 * (3 + distcc.MAX_ARGC) + max_input
    try:
        for piece in cut(data, points):
            parser.feed(piece)
            if state == "star" and parser.handshake_byte():
                state = "gss" if tokens else "request"
            while state == "gss" and (token := parser.gss_token()) is not None:
                if not 0 < len(token) <= distcc.MAX_TOKEN:
                    raise Crash(f"a token of {len(token)} bytes")
                seen += 1
                state = "gss" if seen < tokens else "request"
            if state == "request" and (request := parser.request()) is not None:
                if len(request.source) > max_input:
                    raise Crash(f"a source of {len(request.source)} bytes (max_input {max_input})")
                state = "done"
            if len(parser._buffer) > cap:
                raise Crash(f"buffered {len(parser._buffer)} bytes (cap {cap})")
    except distcc.DistccError:
        return "DistccError"
    return "request" if state == "done" else "incomplete"


RUNNERS: dict[str, Callable[[str, bytes, list[int], dict[str, Any]], str]] = {"protocol": run_protocol, "distcc": run_distcc}
BUILDERS: dict[str, Callable[[random.Random], Base]] = {"protocol": protocol_base, "distcc": distcc_base}


def save_crash(crash_dir: Path, record: dict[str, Any]) -> Path:
    crash_dir.mkdir(parents=True, exist_ok=True)
    path = crash_dir / f"crash-{record['parser']}-{record['seed']}-{record['worker']}-{record['index']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def worker(args: tuple[int, int, int, str, float]) -> dict[str, Any]:
    """``count`` inputs per parser from seed ``seed``/``index``; outcome counters, parse time, crash files."""
    seed, index, count, crash_dir, slow = args
    rng = random.Random(seed * 1_000_003 + index)
    corpora = {name: [build(rng) for _ in range(48)] for name, build in BUILDERS.items()}
    outcomes: dict[str, Counter[str]] = {name: Counter() for name in RUNNERS}
    families: dict[str, Counter[str]] = {name: Counter() for name in RUNNERS}
    spent = {name: 0.0 for name in RUNNERS}
    slowest = (0.0, "")
    crashes: list[str] = []
    for i in range(count):
        for name, run in RUNNERS.items():
            corpus = corpora[name]
            if i % 64 == 0:  # keep the corpus moving
                corpus[rng.randrange(len(corpus))] = BUILDERS[name](rng)
            base = rng.choice(corpus)
            data = mutate(rng, base, rng.choice(corpus)) if rng.random() < 0.95 else base.data
            points = pieces(rng, data)
            start = time.perf_counter()
            try:
                outcome = run(base.family, data, points, base.params)
                problem = None if time.perf_counter() - start < slow else f"slow: {time.perf_counter() - start:.2f} s"
            except BaseException as e:  # noqa: BLE001 - anything but the parser's own error is what we look for
                if isinstance(e, KeyboardInterrupt):
                    raise
                outcome, problem = "crash", "".join(traceback.format_exception(e))
            took = time.perf_counter() - start
            spent[name] += took
            if took > slowest[0]:
                slowest = (took, f"{name}/{base.family}, {len(data)} bytes")
            if problem is not None:
                outcome = "crash"
                if outcomes[name]["crash"] < 20:  # the first 20 per parser per process
                    crashes.append(str(save_crash(Path(crash_dir), {
                        "parser": name, "family": base.family, "seed": seed, "worker": index, "index": i,
                        "params": base.params, "pieces": points, "problem": problem, "input_hex": data.hex(),
                        "input_repr": repr(data)[:4000],
                    })))
            outcomes[name][outcome] += 1
            families[name][base.family] += 1
    return {"outcomes": outcomes, "families": families, "spent": spent, "slowest": slowest, "crashes": crashes}


def replay(path: Path) -> int:
    record = json.loads(path.read_text())
    data = bytes.fromhex(record["input_hex"])
    print(f"{record['parser']}/{record['family']}, {len(data)} bytes, params {record['params']}, pieces {record['pieces']}")
    try:
        print("outcome:", RUNNERS[record["parser"]](record["family"], data, record["pieces"], record["params"]))
        return 0
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000, help="inputs per parser (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--slow", type=float, default=2.0, help="seconds after which one input counts as a crash")
    parser.add_argument("--crash-dir", default=str(Path(tempfile.gettempdir()) / "securecc-fuzz-wire"))
    parser.add_argument("--replay", type=Path, help="run one saved crash again")
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    jobs = max(1, min(args.jobs, args.count))
    shares = [args.count // jobs + (i < args.count % jobs) for i in range(jobs)]
    print(f"fuzz_wire: seed {seed}, {jobs} processes, {args.count:,} inputs per parser "
          f"(pre-handshake frame cap {PREAUTH_FRAME}, MAX_FRAME {MAX_FRAME})", flush=True)
    start = time.perf_counter()
    with multiprocessing.Pool(jobs) as pool:
        results = pool.map(worker, [(seed, i, n, args.crash_dir, args.slow) for i, n in enumerate(shares)])
    wall = time.perf_counter() - start
    crashes = [c for r in results for c in r["crashes"]]
    for name in RUNNERS:
        outcomes = sum((r["outcomes"][name] for r in results), Counter())
        families = sum((r["families"][name] for r in results), Counter())
        spent = sum(r["spent"][name] for r in results)
        total = sum(outcomes.values())
        print(f"{name:8} {total:>10,} inputs  {total / spent:>9,.0f} inputs/s per core (parse only)  "
              + "  ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items()))
              + f"  crashes {outcomes['crash']:,}")
        print(f"{'':8} by family: " + ", ".join(f"{k} {v:,}" for k, v in sorted(families.items())))
    took, what = max(r["slowest"] for r in results)
    inputs = sum(sum(r["outcomes"][name].values()) for r in results for name in RUNNERS)
    print(f"wall {wall:.1f} s, {inputs / wall:,.0f} inputs/s overall (mutation included); slowest input {took * 1000:.1f} ms ({what})")
    if crashes:
        print(f"CRASHES ({len(crashes)} saved; rerun one with --replay FILE):", *crashes, sep="\n  ")
        return 1
    print("no crashes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
