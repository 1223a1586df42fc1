#!/usr/bin/env python3
"""What a hung server costs a build: the same build with the host absent, and with it SIGSTOPped.

Not a test: `.venv/bin/python bench/hung_host.py [-n 24] [-j 4]`. Starts a throwaway realm and two
securecc-servers, builds N generated C files with `make -jJ CC="securecc gcc"`, prints both wall
times and the difference.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
from pathlib import Path

from benchrealm import BIN, Realm, shutil_rm, timed_make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=24, help="C files")
    parser.add_argument("-j", type=int, default=4, help="make -j")
    options = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="scc-hung-", dir="/tmp"))
    os.chmod(top, 0o755)
    project = top / "project"
    project.mkdir()
    for n in range(options.n):
        (project / f"f{n}.c").write_text(f"#define SCALE(x) ((x) * 3)\nint f{n}(int x) {{ return SCALE(x) + {n}; }}\n")
    (project / "Makefile").write_text("all: " + " ".join(f"f{n}.o" for n in range(options.n))
                                      + "\n%.o: %.c\n\t$(CC) -g -O2 -c $< -o $@\nclean:\n\trm -f *.o\n")
    realm = Realm(top / "realm")
    hung = None
    try:
        _, healthy = realm.server("healthy", slots=4)
        hung, stopped = realm.server("hung", slots=4)
        make = [f"-j{options.j}", f"CC={BIN}/securecc gcc"]
        absent = timed_make(project, make, {**realm.user_env("alice", top / "a"), "SECURECC_HOSTS": healthy})
        hung.send_signal(signal.SIGSTOP)
        with_hung = timed_make(project, make, {**realm.user_env("alice", top / "b"), "SECURECC_HOSTS": f"{stopped} {healthy}"})
        print(f"{options.n} files, make -j{options.j}: host absent {absent:.2f} s, host hung {with_hung:.2f} s, "
              f"lost {with_hung - absent:.2f} s (handshake timeout "
              f"{os.environ.get('SECURECC_HANDSHAKE_TIMEOUT', '5')} s, then back-off)")
    finally:
        if hung:
            hung.send_signal(signal.SIGCONT)
        realm.close()
        shutil_rm(top)


if __name__ == "__main__":
    main()
