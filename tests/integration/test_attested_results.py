"""Attested results end to end: the client pins a server's key on first use and refuses another after it."""

from __future__ import annotations

import base64
import json
import subprocess

from conftest import securecc


def test_a_result_is_attested_pinned_and_a_changed_key_refused(realm, server, own_server, workdir):
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")
    done = securecc(realm, server, "alice", workdir, "gcc", "-c", "a.c", SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled a.c on 127.0.0.1" in done.stderr, done.stderr
    state = json.loads((workdir / ".cache" / "securecc" / "hosts.json").read_text())
    pinned = state["keys"]["securecc/localhost@TEST.REALM"]
    public = subprocess.run(["openssl", "pkey", "-pubin", "-in", f"{realm.dir / 'signing.key'}.pub", "-outform", "DER"],
                            capture_output=True, check=True).stdout
    assert base64.b64decode(pinned) == public[-32:]  # the raw key at the end of its DER form

    other = workdir / "other-signing.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(other)], check=True, capture_output=True)
    other.chmod(0o600)
    impostor = own_server(signing_key=str(other))  # the same principal, another result key
    (workdir / "a.o").unlink()
    refused = securecc(realm, impostor, "alice", workdir, "gcc", "-c", "a.c")
    assert refused.returncode == 0 and (workdir / "a.o").exists()  # compiled here instead
    assert b"another key than the one pinned for securecc/localhost@TEST.REALM" in refused.stderr, refused.stderr
    assert b"compiling locally" in refused.stderr and refused.stderr.count(b"\n") == 1, refused.stderr
