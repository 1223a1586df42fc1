"""acl.yaml's validation: each mistake is an AclError naming the file and the line (securecc.yamlfile's loader)."""

from __future__ import annotations

import pytest

from securecc.acl import AclError, decide, load_acl, parse_acl


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("realms: [A]\nallow: []\nalow: []\n", ":3: unknown key 'alow' in acl.yaml"),
        ("realms: []\n", ":1: 'realms' must list at least one"),
        ("realms: [A]\nallow:\n  - group: x\n    max_job: 3\n", ":4: unknown key 'max_job' in an allow rule"),
        ("realms: [A]\nallow:\n  - group: x\n    principal: y\n", ":3: an allow rule names exactly one group or one principal"),
        ("realms: [A]\nallow:\n  - group: x\n    max_jobs: many\n", ":4: 'max_jobs' must be a positive whole number"),
        ("realms: [A]\ndeny: {principals: alice}\n", ":2: 'principals' must be a list of names"),
        ("realms: [A]\nallow: [{group: x}\n", ":3: "),
        ("realms: [A]\nrealms: [B]\n", ":2: 'realms' appears twice"),
        ("realms: [A]\nallow:\n  groups: [committers]\n", ":2: 'allow' must be a list of rules"),
        ("realms: [A]\ndeny:\n  principals: [alice@a]\n", ":3: principal 'alice@a' must be NAME or NAME@REALM"),
        ("realms: [A]\nallow:\n  - principal: robot@B\n", ":3: principal 'robot@B' must be NAME"),
        ("realms: [A]\nadmins:\n  principals: [alice@]\n", ":3: principal 'alice@' must be NAME"),
        ("realms: [A, B]\nallow:\n  - principal: robot\n", ":3: principal 'robot' has no realm, and several realms"),
        ("realms: [A, B]\nadmins:\n  principals: [alice]\n", ":3: principal 'alice' has no realm, and several realms"),
        ("realms: [A]\nallow:\n  - group: x\n  - committers\n", ":4: each allow rule must be a mapping"),
        ("realms:\n  - A\n  - ''\n", ":3: 'realms' must list at least one Kerberos realm"),
        ("realms: [A]\ndeny:\n  groups:\n    - x\n    - [y]\n", ":5: 'groups' must be a list of names"),
        ("realms: [A]\nallow:\n  - group: x\n    group: y\n", ":4: 'group' appears twice"),
        ("realms: [A]\nallow:\n  - <<: {group: x}\n", ":3: merge keys (<<) are not supported"),
        ("realms: [A]\nallow:\n  - group: !!python/object:os.system {}\n", ":3: could not determine a constructor"),
        ("", ":1: expected a mapping with keys admins, allow, deny, realms"),
    ],
)
def test_bad_acl_is_an_error_with_its_line(tmp_path, text, message):
    """Typos and wrong types are errors naming file and line, never a silently different policy."""
    path = tmp_path / "acl.yaml"
    path.write_text(text)
    with pytest.raises(AclError) as caught:
        load_acl(path)
    assert str(caught.value).startswith(f"{path}{message}"), caught.value


def test_an_empty_section_grants_and_denies_nothing():
    acl = parse_acl("realms: [A]\nallow:\ndeny:\nadmins:\n  groups:\n", "acl.yaml")
    assert (acl.allow, acl.deny_principals, acl.deny_groups, acl.admin_groups) == ((), frozenset(), frozenset(), frozenset())


def test_rules_keep_their_lines():
    acl = parse_acl("realms: [A]\nallow:\n  - group: x\n\n  - principal: robot\n    max_jobs: 2\n", "acl.yaml")
    assert [(rule.name, rule.line) for rule in acl.allow] == [("x", 3), ("robot", 5)]


ALLOWS_MALLORY = "realms: [TEST.REALM]\nallow:\n  - principal: mallory\n"


@pytest.mark.parametrize("deny", [
    "deny: &d {principals: [mallory]}\nadmins: *d\n",  # an anchor and its alias: the same list, twice
    "deny: {principals: &p [mallory]}\nadmins: {principals: *p}\n",
    "deny: !!map {principals: [mallory]}\n",
    "!!str deny: {principals: [mallory]}\n",
    "deny: {principals: [mallory, mallory]}\n",
    "deny: {principals: [mallory]}\ndeny: {principals: []}\n",  # a second deny replaced the first, for safe_load
    "deny: {principals: [mallory]}\n\"deny\": {}\n",
    "deny: {principals: [mallory]}\n? deny\n: {}\n",
    "deny: {principals: [mallory], principals: []}\n",
    "x: &x {principals: [mallory]}\ndeny: {<<: *x}\n",
    "deny: {principals: !!set {mallory}}\n",
    "deny: !!omap [principals: [mallory]]\n",
    "deny: !!seq {principals: [mallory]}\n",
    "deny: {principals: [mallory]}\n---\ndeny: {}\n",
    "deny: {principals: [no]}\n",  # YAML 1.1's false, not a principal called no
    "deny: {principals: [mallory]}\nDeny: {}\n",
    "deny: {principals: [mallory@TEST.REALM\u200b]}\n",  # a zero-width space: an entry that could never match
])
def test_no_construct_drops_the_deny_list_silently(deny):
    """An ACL that allows mallory and denies her, written in YAML's odder ways: refused whole, or she stays denied."""
    try:
        acl = parse_acl(ALLOWS_MALLORY + deny, "acl.yaml")
    except AclError as e:
        assert str(e).startswith("acl.yaml:")
        return
    assert acl.deny_principals and not decide(acl, "mallory@TEST.REALM", frozenset(), "gcc").allowed
