"""securecc-admin: the server administrator's tool.

  securecc-admin audit keygen --out /etc/securecc/audit.key   a new Ed25519 signing key (+ .pub for auditors)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="securecc-admin", description="securecc server administration.")
    areas = parser.add_subparsers(dest="area", required=True)
    audit = areas.add_parser("audit", help="the audit log's signing key").add_subparsers(dest="command", required=True)
    keygen = audit.add_parser("keygen", help="make the server's Ed25519 audit signing key")
    keygen.add_argument("--out", type=Path, required=True, help="private key file to create (never overwritten)")
    options = parser.parse_args(argv)
    from securecc.audit import generate_key

    try:
        public = generate_key(options.out)
    except FileExistsError:
        sys.exit(f"securecc-admin: {options.out} exists; a new key would orphan the old log's checkpoints — "
                 "move it away first if you mean to rotate the key")  # fmt: skip
    except OSError as e:
        sys.exit(f"securecc-admin: cannot write {options.out}: {e.strerror or e}")
    print(f"private key: {options.out} (mode 0600, for the server's audit.key)")
    print(f"public key:  {public} (for auditors: securecc-audit verify --key {public} LOG...)")
