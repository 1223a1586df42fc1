"""Attested results end to end: the client pins a server's key on first use and refuses another after it."""

from __future__ import annotations

import base64
import json
import subprocess

from conftest import BIN, securecc


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


def test_provenance_per_object_checked_against_the_servers_signature_and_log(realm, server, workdir):
    """SECURECC_PROVENANCE: each object received gets its in-toto statement; securecc-audit says who compiled it,
    finds its audit record, and refuses a changed statement or an object without one."""
    for name in ("a", "b"):
        (workdir / f"{name}.c").write_text(f"int {name}(void) {{ return 1; }}\n")
    statements = workdir / "provenance"
    for name in ("a", "b"):
        done = securecc(realm, server, "alice", workdir, "gcc", "-c", f"{name}.c", SECURECC_PROVENANCE=str(statements))
        assert done.returncode == 0, done.stderr
    local = securecc(realm, server, "alice", workdir, "gcc", "-E", "a.c", "-o", "a.i")  # never remote: no statement
    assert local.returncode == 0
    [first, *_] = sorted(statements.iterdir())
    document = json.loads(first.read_text())
    assert document["_type"] == "https://in-toto.io/Statement/v1" and document["subject"][0]["name"].endswith(".o")

    audit = [str(BIN / "securecc-audit"), "provenance", "--dir", str(statements), "--log", str(server.audit_path),
             "--key", f"{realm.dir / 'audit.key'}.pub"]
    checked = subprocess.run([*audit, str(workdir / "a.o"), str(workdir / "b.o")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for line in checked.stdout.splitlines():
        assert "compiled by securecc/localhost@TEST.REALM" in line and "is in the log (verified): for alice@TEST.REALM" in line

    anchored = subprocess.run([*audit, "--signing-key", f"{realm.dir / 'signing.key'}.pub", str(workdir / "a.o")], capture_output=True, text=True)
    assert anchored.returncode == 0, anchored.stdout
    (workdir / "other.key").write_bytes(subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519"], capture_output=True, check=True).stdout)
    stranger = subprocess.run([*audit, "--signing-key", str(workdir / "other.key"), str(workdir / "a.o")], capture_output=True, text=True)
    assert stranger.returncode == 1 and "not one given with --signing-key" in stranger.stdout, stranger.stdout
    assert subprocess.run([*audit, str(workdir / "a.i")], capture_output=True, text=True).returncode == 1  # no statement
    statement = json.loads(document["predicate"]["attestations"][0]["statement"])
    document["predicate"]["attestations"][0]["statement"] = json.dumps({**statement, "compiler_identity": "gcc 1"})
    first.write_text(json.dumps(document))
    tampered = subprocess.run([*audit, str(workdir / "a.o"), str(workdir / "b.o")], capture_output=True, text=True)
    assert tampered.returncode == 1 and "FAILED: its signature does not verify" in tampered.stdout, tampered.stdout

    # the signature checks with openssl too, from what the statement file holds
    fields = json.loads(sorted(statements.iterdir())[-1].read_text())["predicate"]["attestations"][0]
    (workdir / "statement").write_text(fields["statement"])
    (workdir / "signature").write_bytes(base64.b64decode(fields["signature"]))
    (workdir / "server.pem").write_text(fields["public_key_pem"])
    openssl = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(workdir / "server.pem"), "-rawin",
                              "-in", str(workdir / "statement"), "-sigfile", str(workdir / "signature")], capture_output=True, text=True)
    assert openssl.returncode == 0 and "Signature Verified Successfully" in openssl.stdout, openssl.stdout + openssl.stderr
