"""Authorization: decide(), acl.yaml, LDAP against the real slapd, hot reload, the admin tools."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO, free_port, make_job, securecc
from test_job_path import wait_until
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from securecc import protocol as wire
from securecc.acl import (
    SETTLE,
    Acl,
    Rule,
    decide,
    load_acl,
    parse_acl,
    principal_named,
    split_principal,
)
from securecc.client.channel import Channel
from securecc.client.hosts import parse_host
from securecc.server.clock import MONOTONIC, TimeSource
from securecc.server.config import ConfigError, load_config
from securecc.server.directory import Directory, DirectoryUnavailable, LdapConfig, Membership
from securecc.server.lookups import MembershipLookups
from securecc.testing import ManualPool


def credentials_for(realm, user: str):
    """A user's own GSS credentials (its keytab, a private memory cache): threads need not share the environment."""
    import gssapi

    name = gssapi.Name(f"{user}@TEST.REALM", gssapi.NameType.kerberos_principal)
    store = {"ccache": f"MEMORY:{user}-{id(realm)}", "client_keytab": str(realm.dir / f"{user}.keytab")}
    return gssapi.Credentials(name=name, usage="initiate", store=store)

ACL = Acl(
    realms=frozenset({"TEST.REALM"}),
    allow=(
        Rule("principal", "robot@TEST.REALM", max_jobs=4),
        Rule("group", "committers", frozenset({"gcc", "g++"}), max_input=1000),
        Rule("group", "cxx-team", frozenset({"clang++"})),
    ),
    deny_principals=frozenset({"mallory"}),
    deny_groups=frozenset({"suspended"}),
)


@pytest.mark.parametrize(
    ("principal", "groups", "compiler", "size", "reason"),
    [
        ("alice@TEST.REALM", {"committers"}, "gcc", 10, "allowed:group:committers"),
        ("bob@TEST.REALM", set(), "gcc", 10, "denied:not-in-group"),
        ("bob@TEST.REALM", {"users"}, "gcc", 10, "denied:not-in-group"),
        ("robot@TEST.REALM", set(), "clang", 10, "allowed:principal:robot@TEST.REALM"),
        ("alice@OTHER.REALM", {"committers"}, "gcc", 10, "denied:realm-not-accepted"),
        ("alice", {"committers"}, "gcc", 10, "denied:realm-not-accepted"),
        ("mallory@TEST.REALM", {"committers"}, "gcc", 10, "denied:principal-deny-list"),
        ("carol@TEST.REALM", {"committers", "suspended"}, "gcc", 10, "denied:group-deny-list:suspended"),
        ("robot@TEST.REALM", {"suspended"}, "gcc", 10, "denied:group-deny-list:suspended"),
        ("alice@TEST.REALM", {"committers"}, "clang++", 10, "denied:compiler-not-allowed"),
        ("dave@TEST.REALM", {"committers", "cxx-team"}, "clang++", 10, "allowed:group:cxx-team"),
        ("alice@TEST.REALM", {"committers"}, "gcc", 1001, "denied:input-too-large"),
    ],
)
def test_decide(principal, groups, compiler, size, reason):
    """Deny by default, deny beats allow, foreign realms refused; the first rule offering the compiler decides."""
    decision = decide(ACL, principal, frozenset(groups), compiler, size)
    assert (decision.allowed, decision.reason) == (reason.startswith("allowed"), reason)


def test_deciding_rule_carries_its_limits():
    """The rule that allowed a job comes with it: its limits are the job's."""
    assert decide(ACL, "robot@TEST.REALM", frozenset(), "gcc").rule.max_jobs == 4
    assert decide(ACL, "alice@TEST.REALM", frozenset({"committers"}), "gcc").rule.max_input == 1000


@pytest.mark.parametrize(
    ("entry", "principal", "named"),
    [
        ("alice", "alice@TEST.REALM", True),  # a bare name: that name in each accepted realm
        ("alice", "alice@OTHER.REALM", True),
        ("alice@TEST.REALM", "alice@TEST.REALM", True),
        ("alice@TEST.REALM", "alice@OTHER.REALM", False),
        ("alice", "ALICE@TEST.REALM", False),  # case is identity, as in the KDC
        ("alice@TEST.REALM", "alice@test.realm", False),
        ("alice", "alice/admin@TEST.REALM", False),  # another principal, not an alias
        ("alice/admin", "alice/admin@TEST.REALM", True),
        ("alice", "alice\\@TEST.REALM@TEST.REALM", False),  # an escaped @ is part of the name
    ],
)
def test_principal_entries_name_exact_principals(entry, principal, named):
    """Deny, allow and admins entries compare exactly, case and components and realm."""
    assert principal_named(entry, principal) is named


def test_other_spellings_escape_no_deny_and_gain_no_rule():
    """ALICE is not alice: a deny or allow entry for alice neither blocks nor admits it."""
    acl = Acl(frozenset({"TEST.REALM"}), (Rule("principal", "alice"),), deny_principals=frozenset({"alice"}))
    assert decide(acl, "alice@TEST.REALM", frozenset(), "gcc").reason == "denied:principal-deny-list"
    for other in ("ALICE@TEST.REALM", "alice/admin@TEST.REALM"):
        assert decide(acl, other, frozenset(), "gcc").reason == "denied:not-in-group"
    two_realms = parse_acl("realms: [A, B]\ndeny:\n  principals: [alice]\n", "acl.yaml")  # a bare deny denies in both
    assert decide(two_realms, "alice@B", frozenset(), "gcc").reason == "denied:principal-deny-list"
    assert split_principal("a\\@b@TEST.REALM") == ("a\\@b", "TEST.REALM") and split_principal("a\\@b") == ("a\\@b", "")


def test_shipped_acl_and_config_load():
    """etc/acl.yaml and etc/securecc.yaml are valid and say what their comments say."""
    acl = load_acl(REPO / "etc" / "acl.yaml")
    assert acl.realms == {"EXAMPLE.ORG"} and acl.admin_groups == {"securecc-admins"}
    (rule,) = acl.allow
    assert (rule.kind, rule.name, rule.max_jobs, rule.max_input) == ("group", "committers", 16, 134217728)
    assert rule.compilers == {"gcc", "cc", "g++", "c++"} and rule.line == 48
    config = load_config(REPO / "etc" / "securecc.yaml")
    assert config.acl == REPO / "etc" / "acl.yaml" and config.listen_port == 3637
    assert config.compilers["gcc"].path == "/usr/bin/gcc" and config.compilers["g++"].timeout == 3600
    assert config.audit.key == Path("/etc/securecc/audit.key") and config.audit.checkpoint_every == 100
    assert config.sandbox.limits.timeout == 1200 and config.sandbox.mode == "bwrap" and config.slots == 8
    assert config.ldap.membership == ("member", "memberUid") and config.ldap.positive_ttl == 60
    assert config.monitor.port == 3638 and config.monitor.scrapers == {"127.0.0.1", "::1"}
    assert config.ldap.bind == "gssapi" and len(config.ldap.uris) == 2 and config.ldap.user_filter == "(uid={user})"


def line_of(text: str, needle: str) -> int:
    """The line (from 1) of the first line of ``text`` that contains ``needle``."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def test_bad_config_is_an_error(tmp_path):
    """An unknown key in the server config names the file, the line and the key."""
    text = (REPO / "etc" / "securecc.yaml").read_text().replace("  timeout: 1200", "  timout: 1200")
    path = tmp_path / "securecc.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}:{line_of(text, 'timout: 1200')}: unknown key 'sandbox.timout' (known: ")


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        (("slots: 8", "slots: eight"), "slots: eight", "'slots' must be a positive whole number"),
        (("slots: 8", "slots: 0"), "slots: 0", "'slots' must be a positive whole number"),
        (("keytab: /etc/securecc/securecc.keytab", 'keytab: "/etc/securecc/securecc.keytab\\0.old"'), "keytab:",
         "'keytab' contains a NUL character"),
        (("  positive_ttl: 60", "  positive_ttl: .nan"), "positive_ttl: .nan", "'ldap.positive_ttl' must be a number of seconds, 0 or more"),
        (("  positive_ttl: 60", "  positive_ttl: yes"), "positive_ttl: yes", "'ldap.positive_ttl' has the wrong type (bool)"),
        (("  gcc: /usr/bin/gcc", "  gcc: /bin/true"), "gcc: /bin/true", "compiler 'gcc': /bin/true is outside /usr"),
        (("  g++: {path: /usr/bin/g++, timeout: 3600}", "  g++: {path: /usr/bin/g++, timeout: long}"), "timeout: long",
         "'compilers.g++.timeout' has the wrong type (str)"),
        (("  mode: bwrap", "  mode: none"), "mode: none", "'sandbox.mode' must be bwrap or rlimits-only"),
        (("  scrape: [127.0.0.1, \"::1\"]", "  scrape: 127.0.0.1"), "scrape: 127.0.0.1", "'monitor.scrape' must be a list of addresses"),
        (("  handshake: 10", "  handshake: 10\n  handshake: 20"), "handshake: 20", "'handshake' appears twice"),
        (("slots: 8", "slots: 8\n\tjobs: 8"), "\tjobs: 8", "while scanning for the next token, found character '\\t'"),
    ],
)
def test_config_errors_name_their_line(tmp_path, change, where, message):
    """Every config error says FILE:LINE: what is wrong, as acl.yaml's do; a key given twice is one of them."""
    text = (REPO / "etc" / "securecc.yaml").read_text()
    assert change[0] in text
    text = text.replace(*change, 1)
    path = tmp_path / "securecc.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}:{line_of(text, where)}: {message}"), caught.value


# --- LDAP against the real slapd --------------------------------------------------------------


@pytest.fixture
def directory(realm, monkeypatch, tmp_path):
    """Directories binding with SASL GSSAPI as the service, from its keytab."""
    monkeypatch.setenv("KRB5_CONFIG", realm.info["env"]["KRB5_CONFIG"])
    monkeypatch.setenv("KRB5_CLIENT_KTNAME", str(realm.dir / "service.keytab"))
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{tmp_path}/service.ccache")

    def make(uris: tuple[str, ...] | None = None, clock: TimeSource = MONOTONIC, **settings: object) -> Directory:
        return Directory(LdapConfig(uris or (realm.info["ldap_uri"],), "dc=test,dc=realm", "ou=people,dc=test,dc=realm",
                                    "ou=groups,dc=test,dc=realm", **settings), clock)

    return make


def ldap_admin(realm, ldif: str) -> None:
    """Change the directory as its rootdn (the test plays the LDAP admin)."""
    env = {**os.environ, "LDAPNOINIT": "1"}
    subprocess.run(["ldapmodify", "-x", "-H", realm.info["ldap_uri"], "-D", realm.info["ldap_admin"]["dn"],
                    "-w", realm.info["ldap_admin"]["password"]], input=ldif.encode(), env=env, check=True,
                   capture_output=True)


@pytest.mark.parametrize(
    ("membership", "expected"),
    [(("member",), {"committers"}), (("memberUid",), {"committers-posix"}), (("memberOf",), {"committers"})],
)
def test_membership_models(directory, membership, expected):
    """groupOfNames (member DN), posixGroup (memberUid) and memberOf on the user entry each find alice; never bob."""
    d = directory(membership=membership, nested=False)
    assert d.groups_of("alice@TEST.REALM") == expected
    assert d.groups_of("bob@TEST.REALM") == frozenset()
    assert d.groups_of("nosuch*)(uid=*@TEST.REALM") == frozenset()  # filter injection is escaped


NOT_ALICE = ["ALICE@TEST.REALM", "Alice@TEST.REALM", "alice/admin@TEST.REALM", "alice@OTHER.REALM",
             "alice\\@TEST.REALM@TEST.REALM"]


@pytest.mark.parametrize("membership", [("member",), ("memberUid",), ("memberOf",)])
def test_only_alice_gets_alices_groups(directory, membership):
    """uid matches case-insensitively and ignores realms: the entry found must still name the principal exactly."""
    d = directory(membership=membership)
    assert d.groups_of("alice@TEST.REALM")
    acl = Acl(frozenset({"TEST.REALM", "OTHER.REALM"}), (Rule("group", "committers"), Rule("group", "committers-posix")),
              deny_principals=frozenset({"alice"}))
    for other in NOT_ALICE:
        membership_of_other = d.membership(other)
        assert membership_of_other.groups == frozenset(), other
        assert not decide(acl, other, membership_of_other.groups, "gcc").allowed, other
    assert "principal-mismatch" in d.membership("ALICE@TEST.REALM").facts[0]


def test_uid_names_principals_of_the_directorys_realm_only(directory):
    """A bare uid is a name in one realm: the configured one, else the base DN's (dc=test,dc=realm)."""
    assert directory().config.home_realm == "TEST.REALM"
    elsewhere = directory(realm="OTHER.REALM")
    assert elsewhere.groups_of("alice@OTHER.REALM") == {"committers", "committers-posix"}
    assert elsewhere.groups_of("alice@TEST.REALM") == frozenset()
    assert LdapConfig((), "o=example", "", "").home_realm == ""  # cannot tell: uid entries name nobody
    assert LdapConfig((), "ou=x,dc=Corp,dc=example,dc=org", "", "").home_realm == "CORP.EXAMPLE.ORG"


@pytest.mark.parametrize("principal", ["*@TEST.REALM", "al*@TEST.REALM", "alice)(uid=*@TEST.REALM",
                                       "ali\\ce@TEST.REALM", "alice\x00@TEST.REALM", "(alice@TEST.REALM"])
def test_filter_characters_in_principals_are_escaped(directory, principal):
    """Characters special to LDAP filters match only themselves: no wildcard, no injected clause, no error."""
    assert directory().membership(principal).groups == frozenset()


class FakeConnection:
    """An LDAP connection that returns the given user entries and records each filter it is sent."""

    def __init__(self, *users: tuple[str, dict[str, list[bytes]]]) -> None:
        self.users, self.filters = list(users), []

    def search_s(self, base, scope, filterstr, attrs):
        self.filters.append(filterstr)
        if base.startswith("ou=people"):
            return self.users
        return [("cn=committers,ou=groups,dc=test,dc=realm", {"cn": [b"committers"]})] if len(self.filters) == 2 else []


def fake_directory(connection: FakeConnection) -> Directory:
    d = Directory(LdapConfig(("ldap://unused/",), "dc=test,dc=realm", "ou=people,dc=test,dc=realm",
                             "ou=groups,dc=test,dc=realm", membership=("member", "memberUid")), MONOTONIC)
    d._connection = lambda: connection  # every query thread's connection
    return d


def test_filter_is_escaped_as_sent():
    """The filter sent to LDAP escapes * ( ) \\ and NUL in the name."""
    connection = FakeConnection()
    fake_directory(connection).membership("a*)(uid=\\\x00@TEST.REALM")
    assert connection.filters == [r"(uid=a\2a\29\28uid=\5c\00)"]


def test_krb_principal_name_must_equal_the_principal():
    """An entry with krbPrincipalName is exactly those principals, whatever its uid says."""
    entry = ("uid=alice,ou=people,dc=test,dc=realm", {"uid": [b"alice"], "krbPrincipalName": [b"alice@OTHER.REALM"]})
    assert fake_directory(FakeConnection(entry)).groups_of("alice@OTHER.REALM") == {"committers"}
    assert fake_directory(FakeConnection(entry)).groups_of("alice@TEST.REALM") == frozenset()  # uid alone: not enough
    assert fake_directory(FakeConnection(entry)).groups_of("ALICE@OTHER.REALM") == frozenset()
    no_uid = ("cn=svc,ou=people,dc=test,dc=realm", {"krbPrincipalName": [b"x@TEST.REALM", b"svc/ci@TEST.REALM"]})
    connection = FakeConnection(no_uid)
    assert fake_directory(connection).groups_of("svc/ci@TEST.REALM") == {"committers"}
    assert "memberUid" not in connection.filters[1]  # no uid: no posixGroup membership to ask for
    uid_entry = ("uid=alice,ou=people,dc=test,dc=realm", {"uid": [b"alice"]})
    assert fake_directory(FakeConnection(uid_entry, uid_entry)).groups_of("alice@TEST.REALM") == frozenset()  # ambiguous


def test_nested_groups_and_principal_attribute_mapping(realm, directory):
    """A group holding the committers group counts; users can be found by another attribute."""
    ldap_admin(realm, "dn: cn=release,ou=groups,dc=test,dc=realm\nchangetype: add\nobjectClass: groupOfNames\n"
                      "cn: release\nmember: cn=committers,ou=groups,dc=test,dc=realm\n")
    try:
        assert "release" in directory().groups_of("alice@TEST.REALM")
        assert "release" not in directory(nested=False).groups_of("alice@TEST.REALM")
        by_mail = directory(user_filter="(|(uid={user})(mail={principal}))")
        assert "committers" in by_mail.groups_of("alice@TEST.REALM")
    finally:
        ldap_admin(realm, "dn: cn=release,ou=groups,dc=test,dc=realm\nchangetype: delete\n")


def test_external_bind_over_ldapi(realm):
    """SASL EXTERNAL over ldapi:// binds as the server's own uid (here mapped to the directory admin)."""
    d = Directory(LdapConfig((realm.info["ldapi_uri"],), "dc=test,dc=realm", "ou=people,dc=test,dc=realm",
                             "ou=groups,dc=test,dc=realm", bind="external"), MONOTONIC)
    assert "committers" in d.groups_of("alice@TEST.REALM")


def test_ldap_failover_and_fail_closed(directory, realm):
    """A dead first URI is skipped; with every URI dead and nothing cached, the lookup fails closed."""
    dead = f"ldap://localhost:{free_port()}/"
    assert "committers" in directory((dead, realm.info["ldap_uri"])).groups_of("alice@TEST.REALM")
    with pytest.raises(DirectoryUnavailable, match="LDAP unavailable"):
        directory((dead,)).groups_of("alice@TEST.REALM")


def test_removal_takes_effect_within_the_positive_ttl(realm, directory):
    """Taking alice out of a group shows once positive_ttl has passed, without a restart (the real slapd, a test clock)."""
    ldap_admin(realm, "dn: cn=temp,ou=groups,dc=test,dc=realm\nchangetype: add\nobjectClass: groupOfNames\n"
                      "cn: temp\nmember: uid=alice,ou=people,dc=test,dc=realm\n")
    try:
        clock = Clock()
        d = directory(clock=clock)
        assert "temp" in d.groups_of("alice@TEST.REALM")
        ldap_admin(realm, "dn: cn=temp,ou=groups,dc=test,dc=realm\nchangetype: modify\nreplace: member\n"
                          "member: uid=bob,ou=people,dc=test,dc=realm\n")
        clock.advance(d.config.positive_ttl - 1)
        assert "temp" in d.groups_of("alice@TEST.REALM")  # cached
        clock.advance(1)
        assert "temp" not in d.groups_of("alice@TEST.REALM")
    finally:
        ldap_admin(realm, "dn: cn=temp,ou=groups,dc=test,dc=realm\nchangetype: delete\n")


# --- lookups from the reactor: fair while LDAP hangs --------------------------------------------


class HangingDirectory:
    """A Directory (same interface) whose LDAP hangs for one principal until released."""

    def __init__(self, hangs_for: str) -> None:
        self.hangs_for, self.release, self.hanging = hangs_for, threading.Event(), threading.Event()
        self.asked: list[str] = []
        self.cache: dict[str, Membership] = {}

    def fresh(self, principal: str) -> Membership | None:
        return self.cache.get(principal)

    def membership(self, principal: str) -> Membership:
        self.asked.append(principal)
        if principal == self.hangs_for:
            self.hanging.set()
            self.release.wait(30)
        return Membership(f"uid={principal}", frozenset({f"group-of-{principal}"}))


class ThreadResults:
    """Stands in for the reactor: answers from pool threads are delivered when the test drains them."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kwargs) -> None:  # noqa: N802 - IReactorThreads
        self.calls.put((f, args, kwargs))

    def drain_until(self, done, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            f, args, kwargs = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            f(*args, **kwargs)


def test_one_principals_lookups_do_not_starve_anothers():
    """50 lookups for alice while LDAP hangs for her, then one for bob: bob's reaches the directory at once."""
    directory, results, pool = HangingDirectory("alice@TEST.REALM"), ThreadResults(), ThreadPool(0, 4, "ldap")
    pool.start()
    try:
        lookups = MembershipLookups.on_pool(directory, results, pool)
        alices = [lookups.lookup("alice@TEST.REALM") for _ in range(50)]
        assert directory.hanging.wait(5)  # alice's lookup is in LDAP (else bob's thread may simply run first)
        bobs: list[Membership] = []
        lookups.lookup("bob@TEST.REALM").addCallback(bobs.append)
        results.drain_until(lambda: bobs, timeout=2.0)  # queue.Empty here: bob waited behind alice
        assert bobs[0].groups == {"group-of-bob@TEST.REALM"}
        assert directory.asked.count("alice@TEST.REALM") == 1 and lookups.in_flight() == 1  # one thread for alice
        directory.release.set()
        answers: list[Membership] = []
        for d in alices:
            d.addCallback(answers.append)
        results.drain_until(lambda: len(answers) == 50)
        assert {a.user_dn for a in answers} == {"uid=alice@TEST.REALM"} and lookups.in_flight() == 0
    finally:
        directory.release.set()
        pool.stop()


def test_a_fresh_answer_takes_no_thread(directory):
    """With the real Directory: once alice's groups are cached, her lookups are answered without the pool."""
    pool, d = ManualPool(), directory()
    lookups = MembershipLookups(d, pool.submit)
    first: list[Membership] = []
    lookups.lookup("alice@TEST.REALM").addCallback(first.append)
    pool.run_next()
    second: list[Membership] = []
    lookups.lookup("alice@TEST.REALM").addCallback(second.append)
    assert not pool.calls and second[0].cached and second[0].groups == first[0].groups == {"committers", "committers-posix"}


class Proxy:
    """A TCP relay to slapd that a test can cut: LDAP goes away for real, mid-session."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        self.sockets.append(upstream)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class HangingRelay(Proxy):
    """A relay to slapd that, once told to hang, holds every connection silent (an LDAP server that froze);
    ``held`` counts the connections it held so: what the server is seen to be waiting for."""

    def __init__(self, port: int) -> None:
        self.hanging, self.held = False, 0
        super().__init__(port)

    def _relay(self, client: socket.socket) -> None:
        if self.hanging:
            self.held += 1
        else:
            super()._relay(client)

    def hang(self) -> None:
        self.hanging = True
        for s in self.sockets[1:]:  # the kept connections die; new ones get no answer
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_a_known_ldap_outage_costs_one_timeout_then_is_probed_in_the_background(realm, own_server, workdir):
    """LDAP hangs after the cache expired: a job with a cached answer waits for LDAP at most 0.5 s, the query it
    started opens the breaker, then jobs are decided at once (a stale answer within max_stale, or a refusal),
    and LDAP is asked again soon after it is back."""
    relay = HangingRelay(realm.info["ldap_port"])
    s = own_server(ldap={"uris": [f"ldap://localhost:{relay.port}/"], "timeout": 2, "positive_ttl": 0,  # expired at once
                         "negative_ttl": 0, "max_stale": 60, "retry_down": 0.5})
    (workdir / "a.c").write_text("int a;\n")

    def job(user: str) -> tuple[float, str]:
        started = time.monotonic()
        securecc(realm, s, user, workdir, "gcc", "-c", "a.c", "-o", "a.o")
        return time.monotonic() - started, s.jobs(principal=f"{user}@TEST.REALM")[-1]["reason"]

    assert job("alice")[1] == "allowed:group:committers"
    relay.hang()
    took, why = job("alice")
    assert why == "allowed:group:committers" and took < 1.5  # its cached answer after 0.5 s: the query goes on
    # The query meets the LDAP timeout (2 s) in the background and opens the breaker, whose probe is the
    # second connection the relay holds.
    assert wait_until(lambda: relay.held >= 2), relay.held
    for user, reason in (("alice", "allowed:group:committers"), ("bob", "denied:ldap-unavailable")) * 2:
        took, why = job(user)
        assert why == reason and took < 1.5, (user, took, why)  # known down: no wait
    relay.hanging = False
    assert wait_until(lambda: job("bob")[1] == "denied:not-in-group")  # LDAP answers bob again


def test_ldap_outage_uses_a_recent_answer_then_fails_closed(realm, own_server, workdir):
    """slapd unreachable: a cached answer younger than max_stale is used, then jobs are refused and audited."""
    proxy = Proxy(realm.info["ldap_port"])
    s = own_server(ldap={"uris": [f"ldap://localhost:{proxy.port}/"], "timeout": 1, "positive_ttl": 0,  # expired at once
                         "negative_ttl": 0, "max_stale": 2})
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")

    def reason() -> tuple[str, str]:
        done = securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")
        assert done.returncode == 0 and (workdir / "a.o").exists()
        return s.jobs(principal="alice@TEST.REALM")[-1]["reason"], done.stderr.decode()

    assert reason()[0] == "allowed:group:committers"
    answered = time.monotonic()
    proxy.cut()
    assert reason()[0] == "allowed:group:committers"  # LDAP down, the answer younger than max_stale: used
    time.sleep(max(0.0, answered + 2 - time.monotonic()))  # max_stale on the server's own clock: nothing to poll
    why, stderr = reason()
    assert why == "denied:ldap-unavailable"
    assert "refused the job: LDAP unavailable" in stderr and stderr.endswith("compiling locally\n")


def test_foreign_realm_refused_by_the_server(realm, own_server, workdir):
    """A principal whose realm the ACL does not list is refused before any LDAP lookup."""
    acl = workdir / "acl.yaml"
    acl.write_text("realms: [OTHER.REALM]\nallow:\n  - group: committers\n")
    s = own_server(acl=str(acl))
    (workdir / "a.c").write_text("int a;\n")
    securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")
    assert s.jobs(principal="alice@TEST.REALM")[-1]["reason"] == "denied:realm-not-accepted"


def test_acl_edits_apply_without_restart(realm, own_server, workdir):
    """A finished edit applies to the next job; a broken edit is logged with its line and the last good ACL stays."""
    acl_path = workdir / "acl.yaml"
    acl_path.write_text((realm.dir / "acl.yaml").read_text())
    s = own_server(acl=str(acl_path))
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")

    def last_reason() -> str:
        securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")
        return s.jobs(principal="alice@TEST.REALM")[-1]["reason"]

    assert last_reason() == "allowed:group:committers"
    acl_path.write_text("realms: [TEST.REALM]\ndeny:\n  principals: [alice]\nallow:\n  - group: committers\n")
    time.sleep(SETTLE)  # the server trusts an edit once it is SETTLE old, and only a job makes it look: nothing to poll
    assert last_reason() == "denied:principal-deny-list"
    acl_path.write_text("realms: [TEST.REALM]\nallow:\n  - group: committers\n    max_jobz: 2\n")
    time.sleep(SETTLE)  # likewise
    assert last_reason() == "denied:principal-deny-list"
    assert f"{acl_path}:4: unknown key 'max_jobz'" in s.log_path.read_text()
    reloads = [r for r in s.audit() if r.get("event") == "acl-reload"]
    assert [r["accepted"] for r in reloads] == [True, False]


def test_sighup_reloads_an_edit_the_clock_missed(realm, own_server, workdir):
    """SIGHUP re-reads acl.yaml even when its size and mtime did not change."""
    acl_path = workdir / "acl.yaml"
    acl_path.write_text("realms: [TEST.REALM]\nallow:\n  - group: committers\n")
    s = own_server(acl=str(acl_path))
    (workdir / "a.c").write_text("int a;\n")
    securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")  # the server accepts before it loads its ACL:
    assert s.jobs(principal="alice@TEST.REALM")[-1]["reason"] == "allowed:group:committers"  # now it has
    stat = acl_path.stat()
    acl_path.write_text("realms: [TEST.REALM]\nallow:\n  - group: committerz\n")  # same size
    os.utime(acl_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")
    assert s.jobs(principal="alice@TEST.REALM")[-1]["reason"] == "allowed:group:committers"
    s.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reloaded ACL" in s.log_path.read_text(), 5)
    securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")
    assert s.jobs(principal="alice@TEST.REALM")[-1]["reason"] == "denied:not-in-group"


def test_per_rule_limits_are_enforced(realm, own_server, workdir, monkeypatch):
    """A rule's compilers, input size and concurrent-job limits bind the jobs it allows."""
    from test_job_path import authenticated_channel, slow_job

    acl = workdir / "acl.yaml"
    acl.write_text("realms: [TEST.REALM]\nallow:\n  - group: committers\n    compilers: [g++]\n"
                   "    max_jobs: 1\n    max_input: 4000\n")
    s = own_server(acl=str(acl))
    channel = authenticated_channel(s, realm, monkeypatch)
    c_job = make_job("gcc", [], "c", "-c", str(workdir), "a.c", b"int a;\n")
    assert channel.call(c_job).reason == "denied:compiler-not-allowed"
    big = make_job("g++", [], "c++", "-c", str(workdir), "b.cc", b"int b;\n" + b"//" * 3000 + b"\n")
    assert channel.call(big).reason == "denied:input-too-large"
    channel.sock.sendall(channel.wire.seal(slow_job(workdir, "20000000L")))  # occupies alice's one slot
    assert wait_until(lambda: s.started() == 1)
    second = authenticated_channel(s, realm, monkeypatch)
    refused = second.call(make_job("g++", [], "c++", "-c", str(workdir), "c.cc", b"int c;\n"))
    assert isinstance(refused, wire.Busy) and refused.reason == "busy:principal-limit"
    second.close()
    channel.close()


def test_reactor_keeps_serving_while_ldap_hangs(realm, own_server, workdir, monkeypatch):
    """200 jobs from several principals, cold cache, LDAP slow to answer: handshakes still complete at once."""
    from test_job_path import authenticated_channel

    blackhole = HangingRelay(realm.info["ldap_port"])  # accepts, never answers
    blackhole.hang()
    s = own_server(ldap={"uris": [f"ldap://localhost:{blackhole.port}/", realm.info["ldap_uri"]], "timeout": 2})
    results: list[object] = []

    for key, value in realm.user_env("alice", workdir).items():
        monkeypatch.setenv(key, value)
    credentials = {user: credentials_for(realm, user) for user in ("alice", "bob")}

    def job(user: str, n: int) -> None:
        try:
            channel = Channel(parse_host(s.hosts))
            channel.authenticate(credentials[user])
            results.append(channel.call(make_job("gcc", ["-O2"], "c", "-c", str(workdir), f"j{n}.c", b"int j;\n")))
            channel.close()
        except Exception as e:  # recorded, asserted below
            results.append(e)

    threads = [threading.Thread(target=job, args=(("alice", "bob")[n % 2], n)) for n in range(200)]
    for t in threads:
        t.start()
    assert wait_until(lambda: blackhole.held >= 2)  # alice's and bob's lookups are stuck on the blackhole (2 s each)
    started = time.monotonic()
    probe = authenticated_channel(s, realm, monkeypatch)
    handshake = time.monotonic() - started
    probe.close()
    for t in threads:
        t.join(120)
    blackhole.cut()
    assert handshake < 1.0, f"handshake took {handshake:.2f} s while LDAP hung"
    assert len(results) == 200 and all(isinstance(r, (wire.Result, wire.Refused, wire.Busy)) for r in results)
    assert sum(isinstance(r, wire.Refused) and r.reason == "denied:not-in-group" for r in results) == 100  # bob
    assert sum(isinstance(r, wire.Result) for r in results) >= 2  # alice, as far as the slots allow


def run_admin(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "securecc-admin", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_acl_lint(tmp_path):
    """lint says OK with counts (exit 0), or the file, line and problem (exit 2)."""
    good = run_admin("acl", "lint", str(REPO / "etc" / "acl.yaml"))
    assert good.returncode == 0 and "OK: realms EXAMPLE.ORG; 1 allow rule(s)" in good.stdout
    bad = tmp_path / "acl.yaml"
    bad.write_text("realms: [A]\nallow:\n  - group: x\n    max_jobs: -1\n")
    result = run_admin("acl", "lint", str(bad))
    assert result.returncode == 2 and result.stderr == f"securecc-admin: {bad}:4: 'max_jobs' must be a positive whole number\n"


def test_acl_check_explains(realm):
    """acl check decides as the server would and says why: the rule and the LDAP facts."""
    config = str(realm.dir / "securecc.yaml")
    env = {k: v for k, v in realm.env.items() if k.startswith("KRB5")}
    alice = run_admin("acl", "check", "alice@TEST.REALM", "--config", config, **env)
    assert alice.returncode == 0, alice.stderr
    assert alice.stdout.startswith("alice@TEST.REALM, compiler gcc: ALLOWED (allowed:group:committers)\n")
    assert "rule at line 7: group committers (any compiler)" in alice.stdout
    assert "LDAP: member of cn=committers,ou=groups,dc=test,dc=realm" in alice.stdout
    bob = run_admin("acl", "check", "bob@TEST.REALM", "--config", config, **env)
    assert bob.returncode == 1 and "DENIED (denied:not-in-group)" in bob.stdout and "groups: none" in bob.stdout
    other = run_admin("acl", "check", "alice@OTHER.REALM", "--config", config, **env)
    assert other.returncode == 1 and "denied:realm-not-accepted" in other.stdout
    odd = run_admin("acl", "check", "alice@TEST.REALM", "--compiler", "tcc", "--config", config, **env)
    assert odd.returncode == 1 and "denied:compiler-not-offered" in odd.stdout
    broken = run_admin("acl", "check", "alice@TEST.REALM", "--config", "/nonexistent.yaml")
    assert broken.returncode == 2 and broken.stderr.startswith("securecc-admin: /nonexistent.yaml")


def test_acl_check_gives_other_spellings_of_alice_nothing(realm):
    """End to end through the admin tool and the real slapd: ALICE and alice/admin are not alice."""
    config = str(realm.dir / "securecc.yaml")
    env = {k: v for k, v in realm.env.items() if k.startswith("KRB5")}
    shouting = run_admin("acl", "check", "ALICE@TEST.REALM", "--config", config, **env)
    assert shouting.returncode == 1 and "DENIED (denied:not-in-group)" in shouting.stdout, shouting.stdout
    assert "groups: none" in shouting.stdout and "principal-mismatch" in shouting.stdout
    admin = run_admin("acl", "check", "alice/admin@TEST.REALM", "--config", config, **env)
    assert admin.returncode == 1 and "DENIED (denied:not-in-group)" in admin.stdout


def test_shipped_systemd_unit_and_crontab_load():
    """etc/securecc-server.service parses and runs the server with the shipped config; the crontab names the check."""
    import configparser

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(REPO / "etc" / "securecc-server.service")
    assert unit["Service"]["ExecStart"].split()[1:] == ["--config", "/etc/securecc/securecc.yaml"]
    assert "HUP" in unit["Service"]["ExecReload"] and "KRB5RCACHETYPE" not in unit["Service"].get("Environment", "")
    crontab = (REPO / "etc" / "cron" / "crontab").read_text().splitlines()
    entry = next(line for line in crontab if line and not line.startswith("#"))
    assert entry.split()[:5] == ["*/5", "*", "*", "*", "*"] and entry.endswith("securecc-health")


def test_distcc_listener_must_be_acknowledged(tmp_path):
    """The cleartext distcc listener is off by default and cannot be enabled without saying so."""
    assert load_config(REPO / "etc" / "securecc.yaml").distcc is None
    text = (REPO / "etc" / "securecc.yaml").read_text() + "distcc:\n  listen: 127.0.0.1:3632\n"
    path = tmp_path / "securecc.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="in the clear"):
        load_config(path)
    path.write_text(text + "  cleartext: true\n")
    config = load_config(path)
    assert (config.distcc.port, config.distcc.principal) == (3632, config.principal)
