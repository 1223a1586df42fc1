"""Authorization: the decide() table, acl.yaml and the server config, LDAP against real slapd."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, securecc
from securecc.acl import Acl, AclError, Directory, DirectoryUnavailable, LdapConfig, decide, load_acl
from securecc.config import ConfigError, load_config

ACL = Acl(
    realms=frozenset({"TEST.REALM"}),
    allow_groups=frozenset({"committers"}),
    allow_principals=frozenset({"robot@TEST.REALM"}),
    deny_groups=frozenset({"suspended"}),
    deny_principals=frozenset({"mallory"}),
)


@pytest.mark.parametrize(
    ("principal", "groups", "allowed", "reason"),
    [
        ("alice@TEST.REALM", {"committers"}, True, "group:committers"),
        ("bob@TEST.REALM", set(), False, "not-in-allowed-group"),
        ("bob@TEST.REALM", {"users"}, False, "not-in-allowed-group"),
        ("robot@TEST.REALM", set(), True, "principal"),
        ("alice@OTHER.REALM", {"committers"}, False, "realm-not-accepted"),
        ("alice", {"committers"}, False, "realm-not-accepted"),
        ("mallory@TEST.REALM", {"committers"}, False, "denied-principal"),
        ("carol@TEST.REALM", {"committers", "suspended"}, False, "denied-group:suspended"),
        ("robot@TEST.REALM", {"suspended"}, False, "denied-group:suspended"),
    ],
)
def test_decide(principal, groups, allowed, reason):
    """Deny by default, deny beats allow, foreign realms are refused."""
    decision = decide(ACL, principal, frozenset(groups))
    assert (decision.allowed, decision.reason) == (allowed, reason)


def test_shipped_acl_and_config_load():
    """etc/acl.yaml and etc/securecc.yaml are valid and say what their comments say."""
    acl = load_acl(REPO / "etc" / "acl.yaml")
    assert acl.realms == {"EXAMPLE.ORG"} and acl.allow_groups == {"committers"} and not acl.deny_principals
    config = load_config(REPO / "etc" / "securecc.yaml")
    assert config.acl == REPO / "etc" / "acl.yaml"
    assert config.compilers["gcc"].path == "/usr/bin/gcc" and config.listen_port == 3637
    assert config.compilers["g++"].timeout == 3600 and config.sandbox.mode == "bwrap"
    assert config.audit.key == Path("/etc/securecc/audit.key") and config.audit.checkpoint_every == 100
    assert config.sandbox.limits.timeout == 1200 and config.compilers["gcc"].timeout == 1200 and config.ldap.bind == "gssapi" and len(config.ldap.uris) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("realms: [A]\nallow: {groups: [x]}\nalow: {}\n", "top level must be a mapping"),
        ("realms: []\n", "'realms' must list at least one"),
        ("realms: [A]\nallow: {group: [x]}\n", "'allow' must be a mapping with keys"),
        ("realms: [A]\ndeny: {principals: alice}\n", "'deny.principals' must be a list"),
        ("realms: [A]\nallow: {groups: [x]\n", "while parsing"),
    ],
)
def test_bad_acl_is_an_error(tmp_path, text, message):
    """Typos and wrong types are errors naming the file, never a silently different policy."""
    path = tmp_path / "acl.yaml"
    path.write_text(text)
    with pytest.raises(AclError, match=message) as caught:
        load_acl(path)
    assert str(path) in str(caught.value)


def test_bad_config_is_an_error(tmp_path):
    """An unknown key in the server config names the key."""
    text = (REPO / "etc" / "securecc.yaml").read_text().replace("  timeout: 1200", "  timout: 1200")
    path = tmp_path / "securecc.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="unknown key 'sandbox.timout'"):
        load_config(path)


@pytest.fixture
def directory(realm, monkeypatch, tmp_path):
    """A Directory binding with SASL GSSAPI as the service, from its keytab."""
    monkeypatch.setenv("KRB5_CONFIG", realm.info["env"]["KRB5_CONFIG"])
    monkeypatch.setenv("KRB5_CLIENT_KTNAME", str(realm.dir / "service.keytab"))
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{tmp_path}/service.ccache")

    def make(uris: tuple[str, ...] = (realm.info["ldap_uri"],), ttl: float = 60) -> Directory:
        return Directory(LdapConfig(uris, "dc=test,dc=realm", "ou=people,dc=test,dc=realm",
                                    "ou=groups,dc=test,dc=realm", "gssapi", cache_ttl=ttl))  # fmt: skip

    return make


def test_ldap_groups(directory):
    """alice is in committers (groupOfNames) and committers-posix (memberUid); bob and strangers in none."""
    d = directory()
    assert d.groups_of("alice") == {"committers", "committers-posix"}
    assert d.groups_of("bob") == frozenset()
    assert d.groups_of("nosuch*)(uid=*") == frozenset()  # filter injection is escaped


def test_ldap_failover_and_fail_closed(directory, realm):
    """A dead first URI is skipped; with every URI dead and nothing cached, the lookup fails closed."""
    dead = f"ldap://localhost:{free_port()}/"
    assert directory((dead, realm.info["ldap_uri"])).groups_of("alice") == {"committers", "committers-posix"}
    with pytest.raises(DirectoryUnavailable, match="LDAP unavailable"):
        directory((dead,)).groups_of("alice")


def test_ldap_answer_is_cached_for_its_ttl(directory, realm):
    """A fresh cached answer survives an LDAP outage; after the TTL the lookup fails closed."""
    d = directory(ttl=1.0)
    assert "committers" in d.groups_of("alice")
    d.config = LdapConfig((f"ldap://localhost:{free_port()}/",), *[getattr(d.config, f) for f in ("base", "users", "groups")],
                          "gssapi", cache_ttl=1.0)  # fmt: skip
    d._local.conn = None
    assert "committers" in d.groups_of("alice")
    time.sleep(1.1)
    with pytest.raises(DirectoryUnavailable):
        d.groups_of("alice")


def test_server_fails_closed_without_ldap(realm, own_server, workdir):
    """LDAP down: alice is refused as ldap-unavailable, audited, and still builds locally."""
    s = own_server(ldap={"uris": [f"ldap://localhost:{free_port()}/"], "timeout": 1})
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")
    done = securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")
    assert done.returncode == 0 and (workdir / "a.o").exists()
    assert "refused the job: LDAP unavailable" in done.stderr.decode()
    assert done.stderr.decode().endswith("compiling locally\n")
    record = s.jobs(principal="alice@TEST.REALM")[-1]
    assert record["decision"] == "refused" and record["reason"] == "ldap-unavailable"


def test_acl_edits_apply_without_restart(realm, own_server, workdir):
    """Denying alice in acl.yaml takes effect on the next job; a broken edit keeps the last good ACL."""
    acl_path = Path(workdir) / "acl.yaml"
    acl_path.write_text((realm.dir / "acl.yaml").read_text())
    s = own_server(acl=str(acl_path))
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")

    def last_reason() -> str:
        securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")
        return s.jobs(principal="alice@TEST.REALM")[-1]["reason"]

    assert last_reason() == "group:committers"
    text = acl_path.read_text()
    acl_path.write_text(text[: text.index("deny:")] + "deny:\n  principals: [alice]\n")
    assert last_reason() == "denied-principal"
    acl_path.write_text("realms: [TEST.REALM\n")  # broken: ignored, previous ACL stays
    assert last_reason() == "denied-principal"
    assert "ACL not reloaded" in s.log_path.read_text()
