"""Property-based fuzzing of both wire parsers: securecc's own protocol and the distcc port.

The contract under test: for any bytes a peer sends, a parser returns events or values, or
raises its own error (:class:`~securecc.protocol.ProtocolError`, :class:`~securecc.distcc.DistccError`);
never another exception (KeyError, UnicodeDecodeError, RecursionError, zstd or LZO errors...),
and never buffers or decompresses past its caps.  Valid inputs round-trip in any split.

Strategies build valid frames, messages and requests, then mutate fields and lengths at their
boundaries; raw bytes cover the rest.  Caps are read from the modules by name: the pre-handshake
frame cap may be smaller than ``MAX_FRAME``.  Runs in a few seconds; set
``SECURECC_FUZZ_EXAMPLES`` for a deeper run.  ``bench/fuzz_wire.py`` runs millions of inputs.
"""

from __future__ import annotations

import json
import os
import random
import struct
import tracemalloc
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securecc import protocol as wire
from securecc.protocol import CHUNK, COMPRESSED, LAST, MAX_FRAME, Kind, ProtocolError
from securecc.server import distcc_wire as distcc

FUZZ = settings(
    max_examples=int(os.environ.get("SECURECC_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,  # nothing written into the work tree; a failure prints its reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

FRAME_HEADER = 5  # u32 length | u8 kind
PREAUTH_FRAME = getattr(wire, "MAX_HANDSHAKE_FRAME", MAX_FRAME)
"""The pre-handshake frame cap if the module has one, else MAX_FRAME."""
REQUEST_BYTES = 12 * (3 + distcc.MAX_ARGC)  # DIST, ARGC, DOTI and every ARGV header


def identity(data: bytes) -> bytes:
    """A stand-in for GSS wrap/unwrap: the fuzzer reaches the chunk layer directly."""
    return data


def secured(max_message: int = wire.MAX_MESSAGE, **options: Any) -> wire.Connection:
    conn = wire.Connection(max_message, **options)
    conn.secure(identity, identity)
    return conn


def frame_cap(conn: wire.Connection) -> int:
    return MAX_FRAME if conn.is_secure else PREAUTH_FRAME


def unpacked(events: list[wire.Event]) -> list[wire.Event]:
    """Events with any deferred compressed message unpacked, as the server does off its loop."""
    packed = getattr(wire, "PackedMessageReceived", ())
    return [wire.unpack_message(e) if packed and isinstance(e, packed) else e for e in events]


def receive(conn: wire.Connection, pieces: list[bytes]) -> list[wire.Event] | ProtocolError:
    """Feed ``pieces`` in order; the events, or the ProtocolError that ended the connection.

    Checks after every call that only an incomplete frame is buffered and only one message's
    worth of chunks is held; any other exception propagates and fails the test.
    """
    events: list[wire.Event] = []
    try:
        for piece in pieces:
            events += unpacked(conn.receive_data(piece))
            assert len(conn._buffer) < FRAME_HEADER + frame_cap(conn)
            assert conn._chunked <= conn.max_message
    except ProtocolError as e:
        return e
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def header(length: int, kind: int) -> bytes:
    return struct.pack(">IB", length, kind)


# --- strategies -------------------------------------------------------------

# Any str, lone surrogates included: JSON escapes them (ensure_ascii) and must give them back.
texts = st.text(st.characters(exclude_categories=()), max_size=40) | st.sampled_from(["", "\udcff", "\ud800x", "é\udfff"])
job_ids = st.from_regex(wire.JOB_ID, fullmatch=True)  # any other is refused (tests/unit/test_protocol.py)
blobs = st.binary(max_size=300)
ints = st.integers(-(2**70), 2**70)


@st.composite
def jobs(draw: st.DrawFn) -> wire.Job:
    paths = draw(st.lists(texts, max_size=4))
    return wire.Job(
        compiler=draw(texts), args=draw(st.lists(texts, max_size=6)), language=draw(texts), mode=draw(texts),
        cwd=draw(texts), source_path=draw(texts), source=draw(blobs), original=draw(blobs),
        environment=draw(st.dictionaries(texts, texts, max_size=3)), compiler_identity=draw(texts),
        include_paths=paths, includes=[draw(blobs) for _ in paths],
    )


messages = st.one_of(
    jobs(),
    st.builds(wire.Result, ints, blobs, blobs, st.none() | blobs, job_ids),
    st.builds(wire.Refused, texts, texts, job_ids),
    st.builds(wire.Busy, texts, ints, ints),
    st.builds(wire.Alive, st.floats(allow_nan=False) | ints),
    st.builds(wire.StatusRequest, st.booleans()),
    st.builds(wire.Status, texts),
)

json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
deep_json = st.builds(lambda n, o: (o * n).encode(), st.integers(1, 70_000), st.sampled_from(["[", '{"a":', "[{\"x\":"]))
lengths = st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, PREAUTH_FRAME, PREAUTH_FRAME + 1, MAX_FRAME, MAX_FRAME + 1, 2**32 - 1])


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few byte flips, insertions, deletions or truncations."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(out)))
        if op == "flip" and out:
            out[at % len(out)] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        else:
            del out[at:]
    return bytes(out)


@st.composite
def messages_bytes(draw: st.DrawFn) -> bytes:
    """An encoded message with its type, header length, JSON header or blobs mutated."""
    data = bytearray(wire.encode_message(draw(messages)))
    end = 5 + int.from_bytes(data[1:5], "big")
    choice = draw(st.integers(0, 4))
    if choice == 0:  # another header: any JSON, maybe the right fields with wrong types
        fields = json.loads(data[5:end])
        for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3)):
            fields[name] = draw(json_values)
        body = json.dumps(draw(st.just(fields) | json_values)).encode()
        data = bytearray(data[:1] + len(body).to_bytes(4, "big") + body + data[end:])
    elif choice == 1:  # a nesting bomb as the header
        body = draw(deep_json)[: wire.MAX_HEADER]
        data = bytearray(data[:1] + len(body).to_bytes(4, "big") + body)
    elif choice == 2:  # the header length field at its boundaries
        data[1:5] = draw(st.sampled_from([0, 1, wire.MAX_HEADER, wire.MAX_HEADER + 1, 2**32 - 1]) | st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    elif choice == 3:
        data[0] = draw(st.integers(0, 255))
    return draw(mutated(bytes(data)))


# --- protocol: messages -----------------------------------------------------


@FUZZ
@given(messages)
def test_every_message_round_trips(message: wire.Message) -> None:
    """encode then decode is the identity, for any str (lone surrogates too) and any bytes."""
    assert wire.decode_message(wire.encode_message(message)) == message


@FUZZ
@given(st.binary(max_size=2000) | messages_bytes())
def test_decode_message_only_raises_protocol_error(data: bytes) -> None:
    try:
        message = wire.decode_message(data)
    except ProtocolError:
        return
    assert type(message) in (wire.Job, wire.Result, wire.Refused, wire.Busy, wire.Alive, wire.StatusRequest, wire.Status)


def test_deeply_nested_headers_are_protocol_errors() -> None:
    """64 KiB of "[" once escaped as RecursionError, in a message header and in an ERROR frame."""
    body = b"[" * wire.MAX_HEADER
    with pytest.raises(ProtocolError):
        wire.decode_message(bytes([1]) + len(body).to_bytes(4, "big") + body)
    payload = b'{"reason":' + b"[" * (PREAUTH_FRAME - 20)
    assert isinstance(receive(wire.Connection(), [header(len(payload) + 1, Kind.ERROR) + payload]), ProtocolError)


# --- protocol: the handshake phase ------------------------------------------


@st.composite
def handshake_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([Kind.HELLO, Kind.TOKEN, Kind.ERROR]) | st.integers(0, 255))
    if kind == Kind.HELLO:
        payload = wire.MAGIC + bytes(draw(st.lists(st.integers(0, 255), min_size=2, max_size=2)))
    elif kind == Kind.ERROR:
        payload = draw(
            st.builds(lambda r, m: json.dumps({"reason": r, "message": m}).encode(), json_values, json_values)
            | json_values.map(lambda v: json.dumps(v).encode())
            | deep_json.map(lambda b: b[: PREAUTH_FRAME - 1])
        )
    else:
        payload = draw(st.binary(max_size=200))
    data = header(len(payload) + 1, kind) + payload
    if draw(st.booleans()):
        data = draw(mutated(data))
    if draw(st.integers(0, 5)) == 0:  # the length field at a boundary
        data = header(draw(lengths), kind) + data[FRAME_HEADER:]
    return data


@FUZZ
@given(st.lists(handshake_frames(), max_size=5).map(b"".join) | st.binary(max_size=500), st.lists(st.integers(0, 10**6), max_size=6))
def test_handshake_frames_only_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    outcome = receive(wire.Connection(), split(data, cuts))
    if not isinstance(outcome, ProtocolError):
        assert all(type(e) in (wire.HelloReceived, wire.TokenReceived, wire.ErrorReceived) for e in outcome)


@FUZZ
@given(st.integers(0, 255), texts, texts, st.binary(min_size=1, max_size=500), st.lists(st.integers(0, 10**6), max_size=6))
def test_valid_handshake_frames_parse_in_any_split(version: int, reason: str, message: str, token: bytes, cuts: list[int]) -> None:
    data = wire.hello(version, version) + wire.token(token) + wire.error(reason, message)
    events = receive(wire.Connection(), split(data, cuts))
    assert events == [wire.HelloReceived(version, version), wire.TokenReceived(token), wire.ErrorReceived(reason, message[:1000])]


@FUZZ
@given(st.sampled_from([PREAUTH_FRAME + 1, MAX_FRAME + 1, 2**31, 2**32 - 1]) | st.integers(PREAUTH_FRAME + 1, 2**32 - 1),
       st.booleans(), st.integers(0, 255))
def test_a_huge_length_is_refused_from_the_header_alone(length: int, secure: bool, kind: int) -> None:
    """Five bytes are enough to refuse a frame over its phase's cap: nothing waits for its body."""
    if secure and length <= MAX_FRAME:
        length = MAX_FRAME + 1
    conn = secured() if secure else wire.Connection()
    assert isinstance(receive(conn, [header(length, kind)]), ProtocolError)


@FUZZ
@given(st.booleans(), st.integers(0, 64 * 1024))
def test_a_frame_at_its_cap_is_buffered_only_up_to_it(secure: bool, short: int) -> None:
    conn = secured() if secure else wire.Connection()
    cap = frame_cap(conn)
    partial = header(cap, Kind.SEALED if secure else Kind.TOKEN) + bytes(max(cap - 2 - short, 0))  # 1 byte short
    assert receive(conn, [partial]) == [] and len(conn._buffer) == len(partial)


# --- protocol: the session phase --------------------------------------------


@st.composite
def big_messages(draw: st.DrawFn) -> wire.Message:
    """A Result around CHUNK bytes or more: compressible or not, so it is sent in 1-3 chunks."""
    size = draw(st.sampled_from([wire.COMPRESS_MIN - 60, wire.COMPRESS_MIN, CHUNK - 80, CHUNK, CHUNK + 1, 2 * CHUNK + 7]) | st.integers(0, 3 * CHUNK))
    seed = draw(st.integers(0, 2**32 - 1))
    data = (seed.to_bytes(4, "big") * (size // 4 + 1))[:size] if draw(st.booleans()) else random.Random(seed).randbytes(size)
    return wire.Result(0, b"", b"", data)


@FUZZ
@given(st.lists(messages | big_messages(), min_size=1, max_size=3), st.lists(st.integers(0, 10**7), max_size=8), st.booleans())
def test_sealed_messages_reassemble_in_any_split(sent: list[wire.Message], cuts: list[int], defer: bool) -> None:
    """Chunked, maybe compressed, sealed messages come back whole however the stream is cut."""
    options = {"defer_unpack": defer} if hasattr(wire, "PackedMessageReceived") else {}
    data = b"".join(secured().seal(m) for m in sent)
    events = receive(secured(**options), split(data, cuts))
    assert events == [wire.MessageReceived(m) for m in sent]


@st.composite
def chunk_streams(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    """A max_message and sealed frames of chunks: flags, sizes at CHUNK's boundaries, zstd or not."""
    max_message = draw(st.sampled_from([0, 1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK]) | st.integers(0, 4 * CHUNK))
    frames = []
    for _ in range(draw(st.integers(1, 4))):
        flags = draw(st.sampled_from([0, LAST, COMPRESSED, LAST | COMPRESSED]) | st.integers(0, 255))
        kind = draw(st.sampled_from(["message", "zstd", "size", "raw"]))
        if kind == "message":
            body = wire.encode_message(draw(messages))
        elif kind == "zstd":
            body = zstandard.ZstdCompressor(level=1).compress(wire.encode_message(draw(messages | big_messages())))
        elif kind == "size":
            body = bytes(draw(st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1])))
        else:
            body = draw(st.binary(max_size=300))
        if draw(st.booleans()):
            body = draw(mutated(body))
        frames.append(wire.frame(Kind.SEALED, bytes([flags]) + body[: MAX_FRAME - 2]) if body or draw(st.booleans()) else header(1, Kind.SEALED))
    return max_message, frames


@FUZZ
@given(chunk_streams(), st.lists(st.integers(0, 10**7), max_size=6), st.booleans())
def test_sealed_chunks_only_raise_protocol_error(stream: tuple[int, list[bytes]], cuts: list[int], defer: bool) -> None:
    max_message, frames = stream
    options = {"defer_unpack": defer} if hasattr(wire, "PackedMessageReceived") else {}
    outcome = receive(secured(max_message, **options), split(b"".join(frames), cuts))
    if not isinstance(outcome, ProtocolError):
        assert all(isinstance(e, wire.MessageReceived) for e in outcome)


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(0, 10**6), max_size=4))
def test_raw_bytes_after_the_handshake_only_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    receive(secured(), split(data, cuts))


def _bomb(size: int) -> bytes:
    """A zstd frame of ``size`` zero bytes, built without holding them."""
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    zeros = bytes(1 << 20)
    return b"".join([*(compressor.compress(zeros) for _ in range(size >> 20)), compressor.flush()])


@pytest.mark.parametrize("defer", [False, True])
def test_a_zstd_bomb_is_refused_without_being_built(defer: bool) -> None:
    """256 MiB of zeros in a 8 KiB frame: refused having held at most the cap and a CHUNK more."""
    if defer and not hasattr(wire, "PackedMessageReceived"):
        pytest.skip("no deferred unpacking here")
    max_message, bomb = 4 * CHUNK, _bomb(256 << 20)
    conn = secured(max_message, **({"defer_unpack": True} if defer else {}))
    tracemalloc.start()
    try:
        assert isinstance(receive(conn, [wire.frame(Kind.SEALED, bytes([LAST | COMPRESSED]) + bomb)]), ProtocolError)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * max_message + 2 * CHUNK + 4 * len(bomb)


@pytest.mark.parametrize("compress", [False, True])
def test_max_message_is_exact(compress: bool) -> None:
    """A message of exactly max_message bytes (once decompressed) is accepted; one byte less of cap refuses it."""
    message = wire.Result(0, b"", b"", bytes(2 * CHUNK + 5) if compress else os.urandom(2 * CHUNK + 5))
    size = len(wire.encode_message(message))
    data = secured().seal(message)
    assert (data[FRAME_HEADER] & COMPRESSED) == (COMPRESSED if compress else 0)
    assert receive(secured(size), [data]) == [wire.MessageReceived(message)]
    assert isinstance(receive(secured(size - 1), [data]), ProtocolError)


def test_a_non_last_chunk_must_be_full() -> None:
    """Empty non-last chunks would pile up frames without counting against max_message."""
    conn = secured(CHUNK)
    assert isinstance(receive(conn, [wire.frame(Kind.SEALED, bytes([0]))]), ProtocolError)


# --- distcc -----------------------------------------------------------------


def distcc_stream(version: int, tokens: list[bytes], argv: list[bytes], source: bytes) -> bytes:
    """What a stock client sends: ``*``, its GSS tokens, then one v1/v2 request."""
    body = distcc.lzo_compress(source) if version == 2 else source
    parts = [b"*", *(distcc.item(b"TLEN", len(t), t) for t in tokens), distcc.item(b"DIST", version), distcc.item(b"ARGC", len(argv))]
    parts += [distcc.item(b"ARGV", len(a), a) for a in argv]
    return b"".join([*parts, distcc.item(b"DOTI", len(body), body)])


Outcome = tuple[list[object], "distcc.DistccError | None"]


def drive(parser: distcc.Parser, pieces: list[bytes], tokens: int) -> Outcome:
    """Feed ``pieces`` as the server does: the ``*``, ``tokens`` GSS tokens, then the request.

    Returns what the parser gave and the DistccError that ended it, checking after every piece
    that no more is buffered than a client may have unread; any other exception fails the test.
    """
    state, got = "star", []
    cap = 1 + 12 + distcc.MAX_TOKEN + REQUEST_BYTES + parser.max_input
    try:
        for piece in pieces:
            parser.feed(piece)
            if state == "star" and parser.handshake_byte():
                state = "gss" if tokens else "request"
            while state == "gss" and (token := parser.gss_token()) is not None:
                assert 0 < len(token) <= distcc.MAX_TOKEN
                got.append(token)
                state = "gss" if len(got) < tokens else "request"
            if state == "request" and (request := parser.request()) is not None:
                got.append(request)
                state = "done"
            assert len(parser._buffer) <= cap
    except distcc.DistccError as e:
        return got, e
    return got, None


argvs = st.lists(st.binary(max_size=40) | st.sampled_from([b"gcc", b"-c", b"x.c", b"-o", b"\xff\xfe"]), max_size=6)
gss_tokens = st.lists(st.binary(min_size=1, max_size=100), max_size=2)
sources = st.binary(max_size=2000) | st.builds(lambda s, n: s * n, st.binary(min_size=1, max_size=10), st.integers(1, 3000))
max_inputs = st.sampled_from([0, 1, 100, 4096, 1 << 20]) | st.integers(0, 1 << 20)


@FUZZ
@given(st.sampled_from([1, 2]), gss_tokens, argvs, sources, st.lists(st.integers(0, 10**6), max_size=8))
def test_valid_distcc_requests_parse_in_any_split(version: int, tokens: list[bytes], argv: list[bytes], source: bytes, cuts: list[int]) -> None:
    data = distcc_stream(version, tokens, argv, source)
    got, error = drive(distcc.Parser(max_input=len(data) + len(source)), split(data, cuts), len(tokens))
    assert error is None
    assert got == [*tokens, distcc.Request(version, [a.decode("utf-8", "surrogateescape") for a in argv], source)]


@st.composite
def mutated_requests(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid stream with its items' values set to boundaries or junk, then bytes mutated."""
    tokens = draw(gss_tokens)
    data = bytearray(distcc_stream(draw(st.sampled_from([1, 2])), tokens, draw(argvs), draw(sources)))
    starts = [i for i in range(len(data) - 11) if data[i : i + 4] in (b"TLEN", b"DIST", b"ARGC", b"ARGV", b"DOTI")]
    for _ in range(draw(st.integers(0, 3)) if starts else 0):
        at = draw(st.sampled_from(starts)) + 4
        value = draw(st.sampled_from([0, 1, 3, distcc.MAX_TOKEN, distcc.MAX_TOKEN + 1, distcc.MAX_ARGC + 1, distcc.MAX_ARG,
                                      distcc.MAX_ARG + 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1))
        digits = draw(st.sampled_from([b"%08x" % value, b"%08X" % value, b" %07x" % (value & 0xFFFFFFF), b"-0000001", b"0x000001"]))
        data[at : at + 8] = digits
    return draw(mutated(bytes(data))), len(tokens)


@FUZZ
@given(mutated_requests() | st.tuples(st.binary(max_size=2000), st.integers(0, 2)), max_inputs, st.lists(st.integers(0, 10**6), max_size=6))
def test_distcc_parser_only_raises_distcc_error(stream: tuple[bytes, int], max_input: int, cuts: list[int]) -> None:
    data, tokens = stream
    got, _ = drive(distcc.Parser(max_input), split(data, cuts), tokens)
    for value in got:
        if isinstance(value, distcc.Request):
            assert len(value.source) <= max_input and sum(len(a.encode("utf-8", "surrogateescape")) for a in value.argv) <= max_input


@FUZZ
@given(st.sampled_from([(b"TLEN", distcc.MAX_TOKEN), (b"ARGV", distcc.MAX_ARG), (b"DOTI", None)]), st.integers(1, 2**32 - 1 - 2**20), max_inputs)
def test_a_length_over_its_cap_is_refused_from_the_header_alone(item: tuple[bytes, int | None], over: int, max_input: int) -> None:
    """12 bytes of header are enough: nothing waits for the body of an item over its cap."""
    token, cap = item
    cap = max_input if cap is None else min(cap, max_input) if token == b"ARGV" else cap
    if token == b"TLEN":
        prefix, tokens = b"*", 1
    else:
        prefix, tokens = b"*" + distcc.item(b"DIST", 1) + distcc.item(b"ARGC", 1 if token == b"ARGV" else 0), 0
    got, error = drive(distcc.Parser(max_input), [prefix + distcc.item(token, min(cap + over, 2**32 - 1))], tokens)
    assert got == [] and error is not None and "exceeds" in str(error)


def test_argv_and_source_share_max_input() -> None:
    """4096 arguments of 64 KiB would be 256 MiB of argv whatever max_input is."""
    argv = [b"a" * 600, b"b" * 300]
    data = distcc_stream(1, [], argv, b"x" * 100)
    assert drive(distcc.Parser(1000), [data], 0)[1] is None
    assert "exceeds" in str(drive(distcc.Parser(999), [data], 0)[1])
    assert "exceeds" in str(drive(distcc.Parser(800), [data], 0)[1])  # the second ARGV, from its header


def test_a_request_in_small_pieces_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call resumes where the last one stopped: rescanning 4096 arguments per 13-byte read took 7 s."""
    argv = [b"x"] * distcc.MAX_ARGC
    data = distcc_stream(1, [], argv, b"")[1:]
    parser, calls, headers = distcc.Parser(1 << 20), 0, 0
    read = parser._header

    def counted(pos: int, token: bytes, cap: int) -> int | None:
        nonlocal headers
        headers += 1
        return read(pos, token, cap)

    monkeypatch.setattr(parser, "_header", counted)
    for piece in split(data, list(range(13, len(data), 13))):
        parser.feed(piece)
        calls += 1
        request = parser.request()
    assert request == distcc.Request(1, ["x"] * distcc.MAX_ARGC, b"")
    assert headers <= 3 * calls + len(argv) + 1


def test_nothing_is_buffered_after_the_request() -> None:
    parser = distcc.Parser(1000)
    assert drive(parser, [distcc_stream(1, [], [b"gcc"], b"int x;")], 0)[1] is None
    with pytest.raises(distcc.DistccError, match="after the request"):
        parser.feed(b"more")


def _lzo_bomb() -> bytes:
    """16 MiB of zeros as one LZO1X block of ~90 KiB (lzallright does not cap its output)."""
    return distcc.lzo_compress(bytes(16 << 20))


@pytest.mark.parametrize("limit", [1 << 20, (16 << 20) - 1])
def test_an_lzo_bomb_is_refused_without_being_built(limit: int) -> None:
    bomb = _lzo_bomb()
    data = distcc_stream(2, [], [b"gcc"], b"")[:-12] + distcc.item(b"DOTI", len(bomb), bomb)
    tracemalloc.start()
    try:
        _, error = drive(distcc.Parser(limit), [data], 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error is not None and "LZO body larger" in str(error)
    assert peak < 4 * len(data) + (1 << 20)
    assert len(distcc.lzo_decompress(bomb, 16 << 20)) == 16 << 20


@FUZZ
@given(sources.map(distcc.lzo_compress).flatmap(mutated) | st.binary(min_size=1, max_size=500), st.integers(0, 1 << 16))
def test_lzo_size_bounds_what_lzallright_decodes(data: bytes, limit: int) -> None:
    """The walk that caps LZO bodies never counts less than the decoder writes."""
    import lzallright

    if not data:
        return
    try:
        decoded = len(lzallright.LZOCompressor.decompress(data))
    except lzallright.LZOError:
        decoded = None
    if decoded is not None:
        assert distcc._lzo_size(data, 2**62) >= decoded
    try:
        out = distcc.lzo_decompress(data, limit)
    except distcc.DistccError:
        return
    assert len(out) <= limit and len(out) == decoded


@FUZZ
@given(sources)
def test_lzo_size_is_exact_on_valid_blocks(source: bytes) -> None:
    if source:
        assert distcc._lzo_size(distcc.lzo_compress(source), 2**62) == len(source)
