"""A compromised job handler rewrites a cache entry on disk: the client must never get its bytes, signed or not."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import securecc


def test_an_entry_rewritten_in_the_handlers_uid_is_compiled_afresh(realm, own_server, workdir):
    """The handler's uid owns the cache: it swaps the object, fixes the entry's own digest and lengths, and drops the
    producer's statement (it holds no key to sign a new one).  The next job compiles again and gets the real object."""
    s = own_server()
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")
    first = securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")
    assert first.returncode == 0, first.stderr
    genuine = (workdir / "a.o").read_bytes()
    [entry] = [p for p in (Path(s.config_path.parent) / "cache").glob("*/*") if not p.name.endswith(".tmp")]
    data = entry.read_bytes()
    header = json.loads(data[: data.index(b"\n")])
    assert "attestation" in header["producer"]
    evil = b"\x7fELF" + b"poisoned" * 40
    stdout_stderr = data[data.index(b"\n") + 1 :][: header["stdout"] + header["stderr"]]
    payload = stdout_stderr + evil
    header["producer"].pop("attestation")
    header.update(output=len(evil), sha256=hashlib.sha256(payload).hexdigest())
    entry.write_bytes(json.dumps(header).encode() + b"\n" + payload)

    (workdir / "a.o").unlink()
    again = securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o", SECURECC_VERBOSE="1")
    assert again.returncode == 0, again.stderr
    assert (workdir / "a.o").read_bytes() == genuine
    assert [r.get("cache") for r in s.jobs(source="a.c") if r["event"] == "job"] == ["stored", "stored"]  # no hit: compiled again
