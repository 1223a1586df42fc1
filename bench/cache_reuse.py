#!/usr/bin/env python3
"""Bob builds a tree Alice just built: wall time against a local build (aim: <= 0.25).

Not a test: `.venv/bin/python bench/cache_reuse.py [--package lua5.4] [-j 2]`.
Fetches the Debian source package (apt-get source), starts a throwaway realm and one server with a
cache, then times: local gcc, Alice through securecc (cache cold), Bob through securecc (cache warm).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchrealm import BIN, Realm, debian_source, shutil_rm, timed_make

ACL = "realms: [TEST.REALM]\nallow:\n  - group: committers\n  - principal: bob\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--package", default="lua5.4")
    parser.add_argument("--target", default="posix", help="make target (lua5.4: posix)")
    parser.add_argument("-j", type=int, default=os.cpu_count() or 2)
    options = parser.parse_args()
    project = debian_source(options.package, Path("/tmp/securecc-bench-src"))
    top = Path(tempfile.mkdtemp(prefix="scc-cache-", dir="/tmp"))
    os.chmod(top, 0o755)
    realm = Realm(top / "realm", ACL)
    try:
        _, host = realm.server("server", slots=os.cpu_count() or 2)
        make = [f"-j{options.j}", options.target]
        local = timed_make(project, [*make, "CC=gcc"])
        via = [*make, f"CC={BIN}/securecc gcc"]
        alice = timed_make(project, via, {**realm.user_env("alice", top), "SECURECC_HOSTS": host})
        bob = timed_make(project, via, {**realm.user_env("bob", top / "bob"), "SECURECC_HOSTS": host})
        print(f"{project.name}, make -j{options.j}: local {local:.2f} s, Alice (cold cache) {alice:.2f} s, "
              f"Bob after Alice {bob:.2f} s = {bob / local:.2f} of local (aim <= 0.25)")
        if os.environ.get("KEEP"):
            print(f"kept {top}")
    finally:
        realm.close()
        if not os.environ.get("KEEP"):
            shutil_rm(top)


if __name__ == "__main__":
    main()
