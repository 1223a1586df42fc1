"""GSS-API against the real KDC: required flags, and one clear sentence per failure."""

from __future__ import annotations

import subprocess
import time

import pytest

from securecc import protocol as wire
from securecc.gss import PEER_FAILED, REQUIRED_FLAGS, Acceptor, GSSFailure, Initiator

SERVICE = "securecc/localhost@TEST.REALM"


@pytest.fixture
def as_user(realm, monkeypatch, tmp_path):
    """Switch this process's Kerberos identity (MIT reads the environment per call)."""

    def switch(user: str | None, **extra: str) -> None:
        for key, value in {**realm.user_env(user, tmp_path), **extra}.items():
            monkeypatch.setenv(key, value)

    return switch


def kadmin(realm, query: str) -> None:
    env = {**realm.env, "KRB5_KDC_PROFILE": str(realm.dir / "kdc.conf")}
    subprocess.run(["kadmin.local", "-r", "TEST.REALM", "-q", query], env=env, check=True, capture_output=True)


def handshake(initiator: Initiator, acceptor_context) -> None:
    reply = acceptor_context.step(initiator.step())
    initiator.step(reply)


def test_mutual_handshake_requires_every_flag_and_seals(realm, as_user):
    """alice and the service authenticate each other; frames are encrypted and tamper-evident."""
    as_user("alice")
    initiator = Initiator(SERVICE)
    server = Acceptor(SERVICE, str(realm.dir / "service.keytab")).new_context()
    handshake(initiator, server)
    assert initiator.complete and server.complete
    assert server.principal == "alice@TEST.REALM"
    assert REQUIRED_FLAGS <= set(initiator._context.actual_flags)
    client_wire = wire.Connection()
    client_wire.secure(initiator.session().wrap, initiator.session().unwrap)

    def server_receives(data: bytes) -> list[wire.Event]:
        server_wire = wire.Connection()
        server_wire.secure(server.session().wrap, server.session().unwrap)
        return server_wire.receive_data(data)

    job = wire.Job("gcc", ["-O2"], "c", "-c", "/src", "a.c", b"int secret_marker;\n")
    first = client_wire.seal(job)
    assert b"secret_marker" not in first  # confidentiality
    assert server_receives(first) == [wire.MessageReceived(job)]
    with pytest.raises(wire.ProtocolError, match="sealed frame rejected"):
        server_receives(first)  # replayed frame
    tampered = bytearray(client_wire.seal(job))
    tampered[-3] ^= 0x40
    with pytest.raises(wire.ProtocolError, match="sealed frame rejected"):
        server_receives(bytes(tampered))  # integrity


def test_no_ticket(as_user):
    """No ccache and no client keytab: 'run kinit'."""
    as_user(None)
    with pytest.raises(GSSFailure, match=r"^no Kerberos ticket: run kinit"):
        Initiator(SERVICE).step()


def test_unknown_server_principal(as_user):
    """A host whose principal the KDC does not know is named in the message."""
    as_user("alice")
    with pytest.raises(GSSFailure, match=r"securecc/nosuch@TEST.REALM is unknown to the KDC"):
        Initiator("securecc/nosuch@TEST.REALM").step()


def test_expired_ticket(realm, as_user, tmp_path):
    """An expired TGT (no keytab to renew it from): 'Kerberos ticket expired: run kinit'."""
    as_user(None)
    env = {**realm.env, "KRB5CCNAME": f"FILE:{tmp_path}/short.ccache"}
    subprocess.run(["kinit", "-l", "1s", "alice"], input=b"alicepw\n", env=env, check=True, capture_output=True)
    time.sleep(2.2)  # fixed: a real ticket ends on the KDC's clock, in whole seconds; this clears its last one with a margin
    as_user(None, KRB5CCNAME=env["KRB5CCNAME"])
    with pytest.raises(GSSFailure, match=r"^Kerberos ticket expired: run kinit"):
        Initiator(SERVICE).step()


def test_clock_skew(realm, as_user, tmp_path):
    """An authenticator older than the acceptor's clock skew is refused as clock skew."""
    as_user("alice")
    token = Initiator(SERVICE).step()
    strict = tmp_path / "krb5-strict.conf"
    strict.write_text((realm.dir / "krb5.conf").read_text().replace("[libdefaults]", "[libdefaults]\n  clockskew = 1", 1))
    time.sleep(2.2)  # fixed: the authenticator must age past the 1 s skew; trying it earlier would spend it (replay cache)
    as_user("alice", KRB5_CONFIG=str(strict))
    context = Acceptor(SERVICE, str(realm.dir / "service.keytab")).new_context()
    with pytest.raises(GSSFailure, match=r"^clock skew too great") as caught:
        context.step(token)
    assert caught.value.token  # the KRB-ERROR goes back to the client


def test_replayed_authenticator_is_refused(realm, as_user):
    """The same AP-REQ presented twice: the replay cache refuses the second."""
    as_user("alice")
    token = Initiator(SERVICE).step()
    acceptor = Acceptor(SERVICE, str(realm.dir / "service.keytab"))
    acceptor.new_context().step(token)
    with pytest.raises(GSSFailure, match="replay"):
        acceptor.new_context().step(token)


def test_stale_server_key_is_explained_to_both_sides(realm, as_user, tmp_path):
    """A server whose keytab lags the KDC's key: both ends get 're-extract the keytab'."""
    as_user("alice")
    stale, current = tmp_path / "stale.keytab", tmp_path / "current.keytab"
    kadmin(realm, "addprinc -randkey securecc/stale@TEST.REALM")
    kadmin(realm, f"ktadd -k {stale} securecc/stale@TEST.REALM")
    kadmin(realm, f"ktadd -k {current} securecc/stale@TEST.REALM")  # new key: the first keytab is stale
    subprocess.run(["kdestroy"], env=realm.user_env("alice", tmp_path), capture_output=True)
    initiator = Initiator("securecc/stale@TEST.REALM")
    context = Acceptor("securecc/stale@TEST.REALM", str(stale)).new_context()
    with pytest.raises(GSSFailure, match="keytab") as caught:
        context.step(initiator.step())
    assert caught.value.token
    with pytest.raises(GSSFailure, match="keytab"):
        initiator.step(caught.value.token)


def test_client_refuses_a_server_holding_another_services_key(realm, as_user):
    """A rogue server with only ldap/localhost's key cannot complete mutual authentication."""
    as_user("alice")
    initiator = Initiator(SERVICE)
    rogue = Acceptor("ldap/localhost@TEST.REALM", str(realm.dir / "ldap.keytab")).new_context()
    with pytest.raises(GSSFailure):
        rogue.step(initiator.step())
    assert not initiator.complete and not rogue.complete


def test_acceptor_without_its_key_fails_at_start(realm):
    """A keytab without the configured principal is a start-up error, not a runtime surprise."""
    with pytest.raises(GSSFailure, match="cannot use keytab"):
        Acceptor(SERVICE, str(realm.dir / "ldap.keytab"))


def test_an_unauthenticated_peer_learns_only_the_explained_failures(realm):
    """What the mechanism says of a failure it has no sentence for (MIT's text may name the server's keytab and
    principals) goes to the server's log and audit record; the peer is told that it failed, no more."""
    context = Acceptor(SERVICE, str(realm.dir / "service.keytab")).new_context()
    with pytest.raises(GSSFailure) as caught:
        context.step(b"\x60\x0bnot a ticket at all")
    assert str(caught.value) == PEER_FAILED
    assert caught.value.detail and caught.value.detail.startswith("Kerberos authentication failed: ") and caught.value.detail != PEER_FAILED
