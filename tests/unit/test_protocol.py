"""The sans-IO wire protocol: frames, handshake events, sealed sessions, message decoding.

The only stand-in is a toy wrap/unwrap pair (XOR with a key plus a CRC-32 that
unwrap checks), enough to show that the Connection chunks, seals, reassembles
and turns any unwrap failure into a ProtocolError.
"""

from __future__ import annotations

import json
import random
import struct
import zlib

import pytest

from securecc import protocol as wire
from securecc.protocol import CHUNK, MAX_FRAME, Job, Kind, ProtocolError, Refused, Result

# --- helpers ----------------------------------------------------------------


def toy_keys(key: bytes = b"not-a-real-key"):
    """A wrap/unwrap pair: XOR with ``key``, then a 4-byte CRC-32 of the plaintext; unwrap verifies it."""

    def xor(data: bytes) -> bytes:
        return bytes(b ^ key[i % len(key)] for i, b in enumerate(data))

    def wrap(plain: bytes) -> bytes:
        return xor(plain) + struct.pack(">I", zlib.crc32(plain))

    def unwrap(token: bytes) -> bytes:
        if len(token) < 4:
            raise ValueError("token too short")
        plain = xor(token[:-4])
        if struct.pack(">I", zlib.crc32(plain)) != token[-4:]:
            raise ValueError("checksum mismatch")
        return plain

    return wrap, unwrap


def secured(max_message: int = wire.MAX_MESSAGE, key: bytes = b"not-a-real-key") -> wire.Connection:
    """A Connection already in its session phase, with the toy keys."""
    conn = wire.Connection(max_message)
    conn.secure(*toy_keys(key))
    return conn


def split_frames(data: bytes) -> list[bytes]:
    """Cut a byte stream into whole frames (header included), trusting the length fields."""
    frames = []
    while data:
        (length,) = struct.unpack_from(">I", data)
        frames.append(data[: 4 + length])
        data = data[4 + length :]
    return frames


def raw_frame(kind: int, payload: bytes) -> bytes:
    """A frame built by hand, bypassing frame()'s own checks."""
    return struct.pack(">IB", len(payload) + 1, kind) + payload


def sealed_chunk(plain: bytes) -> bytes:
    """One SEALED frame holding ``plain`` (flags byte included) wrapped with the toy keys."""
    wrap, _ = toy_keys()
    return raw_frame(Kind.SEALED, wrap(plain))


def feed_in_slices(conn: wire.Connection, data: bytes, sizes) -> list[tuple[int, wire.Event]]:
    """Feed ``data`` in consecutive slices; returns (bytes fed so far, event) for every event."""
    seen = []
    fed = 0
    sizes = iter(sizes)
    while fed < len(data):
        piece = data[fed : fed + next(sizes)]
        fed += len(piece)
        seen += [(fed, event) for event in conn.receive_data(piece)]
    return seen


def random_sizes(seed: int, low: int = 1, high: int = 70_000):
    rng = random.Random(seed)
    while True:
        yield rng.randint(low, high)


def iterbytes(data: bytes):
    """One byte at a time, as Twisted's tests feed protocols."""
    for i in range(len(data)):
        yield data[i : i + 1]


NOISE = random.Random(7).randbytes(4 * 1024 * 1024)  # incompressible: sent as is, so its chunking shows


def result_of_encoded_size(size: int) -> Result:
    """A Result whose encoded message is exactly ``size`` bytes (of noise, which zstd cannot shrink)."""
    stdout_len = size
    for _ in range(5):  # the header spells the lengths in decimal: converge on the digits
        overhead = len(wire.encode_message(Result(0, b"", NOISE[:stdout_len], None))) - stdout_len
        stdout_len = size - overhead
    message = Result(0, b"", NOISE[:stdout_len], None)
    assert len(wire.encode_message(message)) == size
    return message


JOB = Job(
    compiler="gcc",
    args=["-O2", "-g", "-Wall", "-fdiagnostics-color=always"],
    language="c",
    mode="-c",
    cwd="/home/alice/src/projét",
    source_path="src/foo.c",
    source=b'# 0 "src/foo.c"\nint main(void) { return 0; }\n\x00\xff',
    original=b"int main(void) { return 0; }\n",
    environment={"LC_ALL": "fr_FR.UTF-8", "SOURCE_DATE_EPOCH": "1700000000"},
)
JOB_WITH_HEADERS = Job(
    compiler="gcc",
    args=["-Iinclude", "-DX=1", "-g"],
    language="c-source",
    mode="-c",
    cwd="/home/alice/src",
    source_path="main.c",
    source=b"",
    original=b'#include "a.h"\n#include "empty.h"\nint main(void) { return A; }\n',
    include_paths=["/home/alice/src/include/a.h", "/home/alice/src/include/empty.h"],
    includes=[b"#define A 0\n", b""],
)
MESSAGES = {
    "job": JOB,
    "job-minimal": Job("cc", [], "c++", "-S", "/", "a.cc", b"x"),
    "job-with-headers": JOB_WITH_HEADERS,
    "result-with-output": Result(0, b"", b"foo.c:1:1: warning: \xe2\x80\x98x\xe2\x80\x99\n", b"\x7fELF\x00\x01", "job-42"),
    "result-failed": Result(1, b"", b"foo.c:1:1: error: expected\n", None, "job-43"),
    "result-empty-output": Result(0, b"some stdout", b"", b""),
    "result-killed": Result(137, b"", b"", None),
    "refused": Refused("not-authorized", "bob@TEST.REALM is not in an allowed group", "job-44"),
    "refused-empty": Refused("", ""),
}


# --- messages: encode/decode and through two Connections -----------------------------


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
def test_encode_decode_round_trip(message):
    """Every message type, with output None, empty and present, decodes to an equal message."""
    decoded = wire.decode_message(wire.encode_message(message))
    assert decoded == message
    assert type(decoded) is type(message)


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
def test_round_trip_through_two_connections(message):
    """seal() on one side, receive_data() on the other gives back the same message, once."""
    sender, receiver = secured(), secured()
    assert receiver.receive_data(sender.seal(message)) == [wire.MessageReceived(message)]


@pytest.mark.parametrize(("paths", "includes"), [(["/p/a.h"], []), ([], [b"x"]), (["/p/a.h", "/p/b.h"], [b"x"])])
def test_job_with_mismatched_includes_never_round_trips(paths, includes):
    """include_paths and includes pair up: a Job where they do not is refused, not shifted."""
    job = Job("gcc", [], "c-source", "-c", "/p", "m.c", b"", b"int x;", {}, include_paths=paths, includes=includes)
    with pytest.raises((ValueError, ProtocolError)):
        wire.decode_message(wire.encode_message(job))


def test_result_output_none_and_empty_stay_distinct():
    """A failed compile (output None) must not come back as an empty object file, nor the reverse."""
    for output in (None, b""):
        decoded = wire.decode_message(wire.encode_message(Result(0, b"", b"", output)))
        assert isinstance(decoded, Result) and decoded.output == output and (decoded.output is None) == (output is None)


@pytest.mark.parametrize("job_id", ["\x1b[2J\x1b]0;owned\x07", "a" * 65, "../../x", "id with spaces"])
def test_a_job_id_that_a_terminal_or_a_state_file_could_take_amiss_is_refused(job_id):
    """Clients print job ids and keep them in hosts.json: the wire carries none but the servers' own kind."""
    for message in (Result(0, b"", b"", b"o", job_id), Refused("timeout", "slow", job_id)):
        with pytest.raises(ProtocolError, match="job_id"):
            wire.decode_message(wire.encode_message(message))
    assert wire.decode_message(wire.encode_message(Result(0, b"", b"", b"o", "0f3a9c2b7d1e4a58"))).job_id == "0f3a9c2b7d1e4a58"


def test_large_message_in_random_slices():
    """A 1 MiB + 3 byte source spans several CHUNKs; fed in random slices it arrives once, at the last byte."""
    source = random.Random(1).randbytes(1024 * 1024 + 3)
    job = Job("gcc", ["-O2"], "c", "-c", "/src", "big.c", source, source[:1000])
    sender, receiver = secured(), secured()
    data = sender.seal(job)
    frames = split_frames(data)
    assert len(frames) == -(-len(wire.encode_message(job)) // CHUNK) >= 5
    assert all(len(f) - 4 <= MAX_FRAME for f in frames)
    seen = feed_in_slices(receiver, data, random_sizes(seed=7))
    assert seen == [(len(data), wire.MessageReceived(job))]


def test_small_message_one_byte_at_a_time():
    """A message fed byte by byte produces its event with the very last byte and not before."""
    sender, receiver = secured(), secured()
    data = sender.seal(JOB)
    seen = feed_in_slices(receiver, data, iter(lambda: 1, None))
    assert seen == [(len(data), wire.MessageReceived(JOB))]
    events = [e for piece in iterbytes(secured().seal(Refused("busy", "all slots taken"))) for e in receiver.receive_data(piece)]
    assert events == [wire.MessageReceived(Refused("busy", "all slots taken"))]


@pytest.mark.parametrize(
    ("size", "frames"),
    [(CHUNK - 1, 1), (CHUNK, 1), (CHUNK + 1, 2), (2 * CHUNK, 2), (2 * CHUNK + 1, 3)],
)
def test_chunk_boundaries(size, frames):
    """Messages of exactly n*CHUNK bytes need n frames; only the last carries the end flag."""
    message = result_of_encoded_size(size)
    data = secured().seal(message)
    split = split_frames(data)
    assert len(split) == frames
    _, unwrap = toy_keys()
    flags = [unwrap(f[5:])[0] for f in split]
    assert flags == [0] * (frames - 1) + [1]
    assert secured().receive_data(data) == [wire.MessageReceived(message)]


def test_several_messages_on_one_connection():
    """One connection carries several messages; two arriving in one read give two events, in order."""
    sender, receiver = secured(), secured()
    first, second, third = MESSAGES["job"], MESSAGES["result-failed"], MESSAGES["refused"]
    assert receiver.receive_data(sender.seal(first) + sender.seal(second)) == [
        wire.MessageReceived(first),
        wire.MessageReceived(second),
    ]
    assert receiver.receive_data(sender.seal(third)) == [wire.MessageReceived(third)]


# --- the handshake frames ---------------------------------------------------------------


def test_hello_token_and_error_frames():
    """hello(), token() and error() parse into the matching events, in order, from one read."""
    conn = wire.Connection()
    assert not conn.is_secure
    events = conn.receive_data(wire.hello() + wire.token(b"\x60\x82gss") + wire.error("bad-version", "speak 1"))
    assert events == [
        wire.HelloReceived(wire.MIN_VERSION, wire.VERSION),
        wire.TokenReceived(b"\x60\x82gss"),
        wire.ErrorReceived("bad-version", "speak 1"),
    ]


def test_hello_carries_the_version_range():
    assert wire.Connection().receive_data(wire.hello(2, 7)) == [wire.HelloReceived(2, 7)]


def test_error_message_is_truncated():
    """error() bounds the sentence it sends (1000 characters)."""
    [event] = wire.Connection().receive_data(wire.error("r", "x" * 5000))
    assert event == wire.ErrorReceived("r", "x" * 1000)


@pytest.mark.parametrize(
    ("low", "high", "chosen"),
    [(3, 3, 3), (3, 5, 3), (0, 3, 3), (2, 2, None), (0, 0, None), (4, 5, None), (7, 9, None)],
)
def test_choose_version(low, high, chosen):
    """The highest common version, or None when the ranges do not overlap (version 2 results are not attested)."""
    assert (wire.MIN_VERSION, wire.VERSION) == (3, 3)
    assert wire.choose_version(wire.HelloReceived(low, high)) == chosen


def test_empty_token_refused_by_builder_and_parser():
    """An empty GSS token is never sent and never accepted."""
    with pytest.raises(ValueError):
        wire.token(b"")
    with pytest.raises(ProtocolError):
        wire.Connection().receive_data(raw_frame(Kind.TOKEN, b""))


@pytest.mark.parametrize(
    "payload",
    [b"notsecur\x01\x01", b"securecc\x01", b"securecc\x01\x01\x01", b"", b"SECURECC\x01\x01", b"\x01\x01securecc"],
    ids=["wrong-magic", "short", "long", "empty", "case", "reversed"],
)
def test_bad_hello_is_refused(payload):
    with pytest.raises(ProtocolError):
        wire.Connection().receive_data(raw_frame(Kind.HELLO, payload))


@pytest.mark.parametrize("payload", [b"not json", b"[]", b'"reason"', b"5", b'{"reason": "r"}', b'{"message": "m"}'])
def test_malformed_error_frame(payload):
    with pytest.raises(ProtocolError):
        wire.Connection().receive_data(raw_frame(Kind.ERROR, payload))


@pytest.mark.parametrize("kind", [0, 5, 255])
def test_unknown_frame_kind(kind):
    with pytest.raises(ProtocolError):
        wire.Connection().receive_data(raw_frame(kind, b"x"))


# --- caps -----------------------------------------------------------------------------


@pytest.mark.parametrize("secure", [False, True])
def test_oversized_frame_refused_from_its_header(secure):
    """Before the handshake a frame may hold a GSS token (MAX_HANDSHAKE_FRAME), after it MAX_FRAME;
    one larger is refused as soon as the 5-byte header is in, before any payload is buffered."""
    conn = wire.Connection()
    if secure:
        conn.secure(lambda b: b, lambda b: b)
    limit = MAX_FRAME if secure else wire.MAX_HANDSHAKE_FRAME
    header = struct.pack(">IB", limit + 1, Kind.SEALED if secure else Kind.TOKEN)
    assert conn.receive_data(header[:4]) == []
    with pytest.raises(ProtocolError):
        conn.receive_data(header[4:])


def test_largest_handshake_frame_is_accepted():
    """MAX_HANDSHAKE_FRAME itself is allowed: a header announcing it waits for the payload."""
    conn = wire.Connection()
    data = wire.token(b"t" * (wire.MAX_HANDSHAKE_FRAME - 1))
    assert conn.receive_data(data[:-1]) == []
    assert conn.receive_data(data[-1:]) == [wire.TokenReceived(b"t" * (wire.MAX_HANDSHAKE_FRAME - 1))]
    with pytest.raises(ValueError):
        wire.token(b"t" * MAX_FRAME)


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 2**32 - 1])
def test_frame_length_out_of_bounds(length):
    with pytest.raises(ProtocolError):
        wire.Connection().receive_data(struct.pack(">IB", length, Kind.TOKEN))


def test_message_over_max_message_refused_while_chunks_arrive():
    """The cap trips on the first chunk past the limit, before the rest of the message is sent."""
    limit = CHUNK + CHUNK // 2
    frames = split_frames(secured().seal(result_of_encoded_size(3 * CHUNK)))
    receiver = secured(max_message=limit)
    assert receiver.receive_data(frames[0]) == []
    with pytest.raises(ProtocolError):
        receiver.receive_data(frames[1])


def test_message_of_exactly_max_message_is_accepted():
    """max_message is inclusive: one byte more is refused."""
    size = CHUNK + 100
    message = result_of_encoded_size(size)
    data = secured().seal(message)
    assert secured(max_message=size).receive_data(data) == [wire.MessageReceived(message)]
    with pytest.raises(ProtocolError):
        secured(max_message=size - 1).receive_data(data)


def test_max_message_counts_per_message():
    """The budget is per message: many messages below the cap on one connection are fine."""
    message = result_of_encoded_size(1000)
    sender, receiver = secured(), secured(max_message=1000)
    for _ in range(5):
        assert receiver.receive_data(sender.seal(message)) == [wire.MessageReceived(message)]


# --- phases -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [wire.hello(), wire.token(b"late token"), wire.error("r", "m")],
    ids=["hello", "token", "error"],
)
def test_handshake_frames_after_secure_are_refused(data):
    """Once secured, only SEALED frames are valid: a clear-text frame could be injected by anyone."""
    conn = secured()
    assert conn.is_secure
    with pytest.raises(ProtocolError):
        conn.receive_data(data)


def test_other_kind_with_a_valid_seal_after_secure_is_refused():
    """The frame kind is checked, not only the seal: a TOKEN/HELLO frame carrying a good token is refused."""
    wrap, _ = toy_keys()
    chunk = wrap(b"\x01" + wire.encode_message(JOB))
    assert secured().receive_data(raw_frame(Kind.SEALED, chunk)) == [wire.MessageReceived(JOB)]
    for kind in (Kind.HELLO, Kind.TOKEN, Kind.ERROR, 0, 9):
        with pytest.raises(ProtocolError):
            secured().receive_data(raw_frame(kind, chunk))


def test_sealed_frame_before_secure_is_refused():
    data = secured().seal(JOB)
    with pytest.raises(ProtocolError):
        wire.Connection().receive_data(data)


def test_seal_before_secure_raises():
    with pytest.raises(ProtocolError):
        wire.Connection().seal(JOB)


# --- tampering ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", [0, 1, "middle", -5, -1])
def test_flipped_byte_in_sealed_frame(where):
    """One flipped payload byte fails the toy unwrap; the Connection turns that into a ProtocolError."""
    data = bytearray(secured().seal(JOB))
    payload = range(5, len(data))
    index = payload[len(payload) // 2] if where == "middle" else payload[where]
    data[index] ^= 0x01
    with pytest.raises(ProtocolError):
        secured().receive_data(bytes(data))


def test_wrong_key_is_refused():
    with pytest.raises(ProtocolError):
        secured(key=b"other key").receive_data(secured().seal(JOB))


def test_dropped_frame_of_a_long_message_is_detected():
    """Removing a middle chunk leaves a message whose blob lengths no longer add up."""
    frames = split_frames(secured().seal(result_of_encoded_size(3 * CHUNK)))
    with pytest.raises(ProtocolError):
        secured().receive_data(frames[0] + frames[2])


@pytest.mark.parametrize("plain", [b"\x05" + wire.encode_message(JOB), b"\xff", b""], ids=["flag-4", "flag-ff", "empty"])
def test_bad_chunk_flags(plain):
    """A chunk's flags byte has only LAST and COMPRESSED."""
    with pytest.raises(ProtocolError):
        secured().receive_data(sealed_chunk(plain))


def test_undecodable_message_in_a_valid_seal():
    """A correctly wrapped chunk holding garbage is refused when the message is decoded."""
    with pytest.raises(ProtocolError):
        secured().receive_data(sealed_chunk(b"\x01garbage"))


# --- decode_message rejects -----------------------------------------------------------


def raw_message(code: int, header: object, blobs: bytes = b"", header_len: int | None = None) -> bytes:
    """``u8 type | u32 header length | header | blobs``, header given as an object (JSON) or bytes."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack(">BI", code, len(encoded) if header_len is None else header_len) + encoded + blobs


def result_header(**changes: object) -> dict[str, object]:
    header: dict[str, object] = {"exit_status": 0, "job_id": "j", "attestations": [], "blobs": [2, 3, 1, None]}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not DROP}


def job_header(**changes: object) -> dict[str, object]:
    header: dict[str, object] = {
        "compiler": "gcc", "args": ["-O2"], "language": "c", "mode": "-c", "cwd": "/",
        "source_path": "a.c", "environment": {"LC_ALL": "C"}, "include_paths": [], "compiler_identity": "",
        "system_headers": [], "system_digest": "", "output_path": "", "directories": [], "blobs": [3, 0],
    }
    header.update(changes)
    return {k: v for k, v in header.items() if v is not DROP}


DROP = object()
RESULT_BLOBS = b"ooeeeO"  # stdout "oo", stderr "eee", output "O"


def test_hand_built_messages_decode():
    """The hand-built messages below are valid as they stand: each reject is due to its one change."""
    assert wire.decode_message(raw_message(2, result_header(), RESULT_BLOBS)) == Result(0, b"oo", b"eee", b"O", "j")
    assert wire.decode_message(raw_message(1, job_header(), b"src")) == Job("gcc", ["-O2"], "c", "-c", "/", "a.c", b"src", b"", {"LC_ALL": "C"})
    assert wire.decode_message(raw_message(1, job_header(include_paths=["/p/a.h", "/p/b.h"], blobs=[3, 1, 2, 3]), b"srcOAABBB")) == Job(
        "gcc", ["-O2"], "c", "-c", "/", "a.c", b"src", b"O", {"LC_ALL": "C"},
        include_paths=["/p/a.h", "/p/b.h"], includes=[b"AA", b"BBB"],
    )
    assert wire.decode_message(raw_message(3, {"reason": "r", "message": "m", "job_id": "", "blobs": []})) == Refused("r", "m")
    assert wire.decode_message(raw_message(2, result_header(blobs=[0, 0, None, None]))) == Result(0, b"", b"", None, "j")


BAD_MESSAGES = {
    "empty": b"",
    "too-short": b"\x02\x00\x00",
    "type-0": raw_message(0, result_header(), RESULT_BLOBS),
    "type-4": raw_message(4, result_header(), RESULT_BLOBS),
    "type-255": raw_message(255, result_header(), RESULT_BLOBS),
    "header-length-past-end": raw_message(2, result_header(), RESULT_BLOBS, header_len=10_000),
    # valid JSON padded with blanks: only the size cap refuses it
    "header-over-max": raw_message(2, json.dumps(result_header(blobs=[0, 0, 0])).encode().ljust(wire.MAX_HEADER + 1)),
    "header-not-json": raw_message(2, b"{exit_status: 0}", RESULT_BLOBS),
    "header-not-utf8": raw_message(2, b'{"exit_status": "\xff"}', RESULT_BLOBS),
    "header-a-list": raw_message(2, [0, "j", [2, 3, 1]], RESULT_BLOBS),
    "header-a-string": raw_message(2, "exit_status", RESULT_BLOBS),
    "missing-field": raw_message(2, result_header(job_id=DROP), RESULT_BLOBS),
    "attestations-a-string": raw_message(2, result_header(attestations="signed"), RESULT_BLOBS),
    "attestation-a-list": raw_message(2, result_header(attestations=[["s", "k"]]), RESULT_BLOBS),
    "attestation-value-a-number": raw_message(2, result_header(attestations=[{"statement": 1}]), RESULT_BLOBS),
    "missing-blobs": raw_message(2, result_header(blobs=DROP), RESULT_BLOBS),
    "extra-field": raw_message(2, result_header(output=None), RESULT_BLOBS),
    "job-fields-in-result": raw_message(2, job_header(), b"src"),
    "exit-status-bool": raw_message(2, result_header(exit_status=True), RESULT_BLOBS),
    "exit-status-str": raw_message(2, result_header(exit_status="0"), RESULT_BLOBS),
    "exit-status-float": raw_message(2, result_header(exit_status=0.0), RESULT_BLOBS),
    "exit-status-null": raw_message(2, result_header(exit_status=None), RESULT_BLOBS),
    "job-id-int": raw_message(2, result_header(job_id=7), RESULT_BLOBS),
    "args-a-string": raw_message(1, job_header(args="-O2"), b"src"),
    "args-with-int": raw_message(1, job_header(args=["-O2", 2]), b"src"),
    "args-with-null": raw_message(1, job_header(args=[None]), b"src"),
    "args-with-list": raw_message(1, job_header(args=[["-O2"]]), b"src"),
    "args-a-dict": raw_message(1, job_header(args={"-O2": 1}), b"src"),
    "compiler-bool": raw_message(1, job_header(compiler=True), b"src"),
    "cwd-list": raw_message(1, job_header(cwd=["/"]), b"src"),
    "refused-reason-null": raw_message(3, {"reason": None, "message": "m", "job_id": "", "blobs": []}),
    "blobs-not-a-list": raw_message(2, result_header(blobs="2,3,1"), RESULT_BLOBS),
    "blobs-too-few": raw_message(2, result_header(blobs=[2, 4]), RESULT_BLOBS),
    "blobs-too-many": raw_message(2, result_header(blobs=[2, 3, 1, None, 0]), RESULT_BLOBS),
    "blobs-short-of-data": raw_message(2, result_header(blobs=[2, 3, 0, None]), RESULT_BLOBS),
    "blobs-past-data": raw_message(2, result_header(blobs=[2, 3, 2, None]), RESULT_BLOBS),
    "blob-negative": raw_message(2, result_header(blobs=[-1, 6, 1, None]), RESULT_BLOBS),
    "blob-negative-last": raw_message(2, result_header(blobs=[2, 3, 1, -1]), RESULT_BLOBS),
    "blob-str": raw_message(2, result_header(blobs=["2", 3, 1, None]), RESULT_BLOBS),
    "blob-bool": raw_message(2, result_header(blobs=[2, 3, True]), RESULT_BLOBS),
    "blob-float": raw_message(2, result_header(blobs=[2.0, 3, 1]), RESULT_BLOBS),
    "stdout-null": raw_message(2, result_header(blobs=[None, 5, 1]), RESULT_BLOBS),
    "job-source-null": raw_message(1, job_header(blobs=[None, 0])),
    "environment-a-list": raw_message(1, job_header(environment=[["LC_ALL", "C"]]), b"src"),
    "environment-a-string": raw_message(1, job_header(environment="LC_ALL=C"), b"src"),
    "environment-int-value": raw_message(1, job_header(environment={"SOURCE_DATE_EPOCH": 0}), b"src"),
    "environment-null-value": raw_message(1, job_header(environment={"LC_ALL": None}), b"src"),
    "environment-missing": raw_message(1, job_header(environment=DROP), b"src"),
    "include-paths-a-string": raw_message(1, job_header(include_paths="/p/a.h", blobs=[3, 0, 2]), b"srcAA"),
    "include-paths-int": raw_message(1, job_header(include_paths=[1], blobs=[3, 0, 2]), b"srcAA"),
    "include-without-blob": raw_message(1, job_header(include_paths=["/p/a.h"]), b"src"),
    "blob-without-include": raw_message(1, job_header(blobs=[3, 0, 2]), b"srcAA"),
    "include-blob-null": raw_message(1, job_header(include_paths=["/p/a.h"], blobs=[3, 0, None]), b"src"),
    "includes-in-header": raw_message(1, job_header(includes=[]), b"src"),
}


@pytest.mark.parametrize("data", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_decode_message_rejects(data):
    """Every malformed message is a ProtocolError (never a TypeError or a half-built message)."""
    with pytest.raises(ProtocolError):
        wire.decode_message(data)


@pytest.mark.parametrize("name", ["blobs-past-data", "args-with-int", "exit-status-bool"])
def test_bad_message_through_a_connection(name):
    """The same rejects arrive as a ProtocolError through receive_data."""
    with pytest.raises(ProtocolError):
        secured().receive_data(sealed_chunk(b"\x01" + BAD_MESSAGES[name]))


C_TEXT = b"".join(b"static int f%d(int x) { return x * %d + (x >> 3); }\n" % (n, n) for n in range(6000))


def test_compressible_message_goes_compressed_and_comes_back_whole():
    """Preprocessed C shrinks several times on the wire; the receiver gets the same message."""
    job = Job("gcc", ["-O2"], "c", "-c", "/w", "big.c", C_TEXT)
    data = secured().seal(job)
    assert len(data) < len(wire.encode_message(job)) / 4
    assert secured().receive_data(data) == [wire.MessageReceived(job)]


def test_small_and_incompressible_messages_go_as_they_are():
    _, unwrap = toy_keys()
    for message in (Refused("denied:x", "no"), result_of_encoded_size(CHUNK // 2)):
        (first, *_) = split_frames(secured().seal(message))
        assert unwrap(first[5:])[0] & wire.COMPRESSED == 0


def test_decompression_bomb_is_refused_within_the_cap():
    """100 MB of zeros packed into a few KB: refused once the unpacked size passes max_message."""
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (100 * 1024 * 1024))
    assert len(bomb) < 10_000
    with pytest.raises(ProtocolError, match="once decompressed"):
        secured(max_message=1024 * 1024).receive_data(sealed_chunk(bytes([wire.LAST | wire.COMPRESSED]) + bomb))


@pytest.mark.parametrize(
    "chunks",
    [
        [(wire.LAST | wire.COMPRESSED, b"not zstd at all")],
        [(wire.COMPRESSED, b"x" * CHUNK), (wire.LAST, b"y")],  # the flag changes mid-message
    ],
    ids=["garbage", "flag-changes"],
)
def test_bad_compressed_chunks_are_protocol_errors(chunks):
    receiver = secured()
    with pytest.raises(ProtocolError):
        for flags, payload in chunks:
            receiver.receive_data(sealed_chunk(bytes([flags]) + payload))
