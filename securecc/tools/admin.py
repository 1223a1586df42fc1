"""securecc-admin: the server administrator's tool.

  securecc-admin audit keygen --out /etc/securecc/audit.key    a new Ed25519 audit key (+ .pub for auditors)
  securecc-admin signing keygen --out /etc/securecc/signing.key  a new Ed25519 key that signs every result
  securecc-admin acl lint acl.yaml                             validate an ACL before installing it
  securecc-admin acl check PRINCIPAL [--compiler gcc]          what the server would decide, and why
  securecc-admin revoke PRINCIPAL [HOST...]                    end PRINCIPAL's access now on every server of your
                                                               host list (or the HOSTs): jobs killed, sessions closed

Exit status of ``acl``: 0 allowed (or valid), 1 denied, 2 invalid or unusable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="securecc-admin", description="securecc server administration.")
    areas = parser.add_subparsers(dest="area", required=True)
    audit = areas.add_parser("audit", help="the audit log's signing key").add_subparsers(dest="command", required=True)
    keygen = audit.add_parser("keygen", help="make the server's Ed25519 audit signing key")
    keygen.add_argument("--out", type=Path, required=True, help="private key file to create (never overwritten)")
    signing = areas.add_parser("signing", help="the key that signs results").add_subparsers(dest="command", required=True)
    signing.add_parser("keygen", help="make the server's Ed25519 result signing key").add_argument(
        "--out", type=Path, required=True, help="private key file to create (never overwritten)")
    acl = areas.add_parser("acl", help="the access control list").add_subparsers(dest="command", required=True)
    lint = acl.add_parser("lint", help="validate an acl.yaml")
    lint.add_argument("file", type=Path)
    check = acl.add_parser("check", help="decide for a principal as the server would, with the reason")
    check.add_argument("principal", help="e.g. alice@EXAMPLE.ORG")
    check.add_argument("--compiler", default="gcc", help="a compiler name from the server's list (default gcc)")
    check.add_argument("--config", type=Path, default=Path(os.environ.get("SECURECC_CONFIG", "/etc/securecc/securecc.yaml")),
                       help="the server's configuration (default $SECURECC_CONFIG or /etc/securecc/securecc.yaml)")
    revoke = areas.add_parser("revoke", help="end a principal's access now on every server (as an ACL admin)")
    revoke.add_argument("principal", help="e.g. mallory@EXAMPLE.ORG")
    revoke.add_argument("hosts", nargs="*", help="servers, as in SECURECC_HOSTS (default: your host list)")
    options = parser.parse_args(argv)
    if options.area == "revoke":
        revoke_command(options.principal, options.hosts)
    elif options.area in ("audit", "signing"):
        keygen_command(options.out, options.area)
    elif options.command == "lint":
        lint_command(options.file)
    else:
        check_command(options.principal, options.compiler, options.config)


def keygen_command(out: Path, area: str) -> None:
    """A new Ed25519 key: the audit log's (checkpoints) or the results' (securecc.attest); never the other's."""
    from securecc.audit import generate_key

    why = ("a new key would orphan the old log's checkpoints" if area == "audit"
           else "clients pin a server's key: a new one is refused until each user forgets the old")
    try:
        public = generate_key(out)
    except FileExistsError:
        sys.exit(f"securecc-admin: {out} exists; {why} — move it away first if you mean to rotate the key")
    except OSError as e:
        sys.exit(f"securecc-admin: cannot write {out}: {e.strerror or e}")
    if area == "audit":
        print(f"private key: {out} (mode 0600, for the server's audit.key)")
        print(f"public key:  {public} (for auditors: securecc-audit verify --key {public} LOG...)")
    else:
        print(f"private key: {out} (mode 0600, the server config's signing_key)")
        print(f"public key:  {public} (what clients pin for this server's principal)")


def revoke_command(principal: str, given: list[str]) -> None:
    """Each server, authenticated as you: your ticket must be an ACL admin's.  Exit 1 if any server did not revoke."""
    import json

    from securecc import protocol as wire
    from securecc.client.channel import Channel, RemoteFailure
    from securecc.client.hosts import HostsError, HostState, configured_hosts, parse_hosts

    try:
        hosts = parse_hosts(" ".join(given)) if given else configured_hosts(HostState())[0]
    except HostsError as e:
        _invalid(f"cannot parse the host list: {e}")
    hosts = [h for h in hosts if not h.is_local]
    if not hosts:
        _invalid("no servers: give them, or set SECURECC_HOSTS")
    failed = 0
    for host in hosts:
        channel = Channel(host)
        try:
            channel.authenticate()
            reply = channel.call(wire.Revoke(principal))
        except RemoteFailure as e:
            reply = wire.Refused(wire.Reason.SERVER_ERROR, str(e))
        finally:
            channel.close()
        if isinstance(reply, wire.Status):
            done = json.loads(reply.json)
            print(f"{host.name}:{host.port}: revoked {principal}: {done['sessions']} session(s) closed, {done['jobs']} job(s) killed")
        else:
            failed += 1
            print(f"securecc-admin: {host.name}:{host.port}: not revoked: {getattr(reply, 'message', type(reply).__name__)}", file=sys.stderr)
    sys.exit(1 if failed else 0)


def _invalid(message: str) -> None:
    print(f"securecc-admin: {message}", file=sys.stderr)
    sys.exit(2)


def lint_command(path: Path) -> None:
    from securecc.acl import AclError, load_acl

    try:
        acl = load_acl(path)
    except AclError as e:
        _invalid(str(e))
    print(f"{path}: OK: realms {', '.join(sorted(acl.realms))}; {len(acl.allow)} allow rule(s); "
          f"deny {len(acl.deny_principals)} principal(s), {len(acl.deny_groups)} group(s); "
          f"admins {len(acl.admin_principals)} principal(s), {len(acl.admin_groups)} group(s)")


def check_command(principal: str, compiler: str, config_path: Path) -> None:
    from securecc.acl import AclError, decide, load_acl, split_principal
    from securecc.server.clock import MONOTONIC
    from securecc.server.config import ConfigError, load_config
    from securecc.server.directory import Directory, DirectoryUnavailable, Membership, use_service_credentials

    try:
        config = load_config(config_path)
        acl = load_acl(config.acl)
    except (ConfigError, AclError) as e:
        _invalid(str(e))
    if compiler not in config.compilers:
        print(f"{principal}, compiler {compiler}: DENIED (denied:compiler-not-offered): "
              f"this server offers {', '.join(sorted(config.compilers))}")
        sys.exit(1)
    membership = Membership(None, frozenset(), ["no LDAP lookup: the realm is not accepted or no rule names a group"])
    if split_principal(principal)[1] in acl.realms and acl.groups:
        if config.ldap.bind == "gssapi":
            use_service_credentials(config.keytab)
        try:
            membership = Directory(config.ldap, MONOTONIC).membership(principal)
        except DirectoryUnavailable as e:
            print(f"{principal}, compiler {compiler}: DENIED (denied:ldap-unavailable): {e}")
            sys.exit(1)
    decision = decide(acl, principal, membership.groups, compiler)
    verdict = "ALLOWED" if decision.allowed else "DENIED"
    print(f"{principal}, compiler {compiler}: {verdict} ({decision.reason})")
    if decision.rule:
        print(f"  by the {decision.rule.describe()} of {acl.path}")
    print(f"  groups: {', '.join(sorted(membership.groups)) or 'none'}")
    for fact in membership.facts:
        print(f"  LDAP: {fact}")
    sys.exit(0 if decision.allowed else 1)
