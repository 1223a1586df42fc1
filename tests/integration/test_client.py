"""The client's own rules: what it loads, how it names outputs, how it finds the real compiler."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import BIN

HEAVY = ("twisted", "ldap", "yaml", "cryptography", "securecc.server.main", "securecc.acl", "securecc.sandbox")


def test_client_loads_nothing_server_side():
    """Everything a remote compile touches on the client side loads no Twisted, LDAP, YAML or crypto."""
    code = (
        "import sys, securecc.client.job, securecc.protocol, securecc.gss, securecc.client.hosts;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_local_compile_does_not_load_gssapi(tmp_path):
    """A compile that is not distributable (here: a link) never imports gssapi."""
    (tmp_path / "m.c").write_text("int main(void) { return 0; }\n")
    code = (
        "import sys, os, securecc.client.job as c\n"
        "os.execv = lambda *a: (print('gssapi' in sys.modules), sys.exit(0))\n"
        "sys.argv = ['securecc', 'gcc', 'm.c', '-o', 'm']; c.main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_usage_errors_are_one_line(tmp_path):
    """No arguments, or a compiler that does not exist: one 'securecc:' line, no traceback."""
    done = subprocess.run([BIN / "securecc"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("securecc: usage:") and done.stderr.count("\n") == 1
    done = subprocess.run([BIN / "securecc", "no-such-cc", "-c", "x.c"], capture_output=True, text=True,
                          env={**os.environ, "SECURECC_HOSTS": ""})
    assert done.returncode == 127
    assert done.stderr == "securecc: compiler 'no-such-cc' not found in PATH; install it or give its full path\n"


def test_bad_host_list_is_explained(tmp_path):
    """A malformed SECURECC_HOSTS is named in one line and the compile still happens locally."""
    (tmp_path / "a.c").write_text("int a;\n")
    env = {**os.environ, "SECURECC_HOSTS": "host:notaport"}
    done = subprocess.run([BIN / "securecc", "gcc", "-c", "a.c"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and (tmp_path / "a.o").exists()
    assert done.stderr == "securecc: a.c: cannot parse the host list (bad port in 'host:notaport'); fix SECURECC_HOSTS; compiling locally\n"
