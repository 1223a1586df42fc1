"""What the user is told: `securecc stats` (the agent's counters), the one-time "most stayed local" notice,
--help and --version; through the real shim and agent."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO, free_port, securecc, stop_agents

import securecc as package
from securecc.client import job as client
from securecc.client.stats import Outcome, Stats, failure_category, is_probe, local_category, natural_category

NOTICE = re.compile(r"securecc: (\d+) of the (\d+) compiles so far stayed local \(mostly (.+): (\d+)\); "
                    r"SECURECC_VERBOSE=1 shows why for each job, `securecc stats` counts them\n")


@pytest.fixture
def agents(workdir):
    """This test's own agent directory (its counters start at zero); its agent is stopped at the end."""
    directory = workdir / "agents"
    yield directory
    stop_agents(directory)


def run(realm, server, workdir: Path, agents: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return securecc(realm, server, "alice", workdir, *args, SECURECC_AGENT_DIR=str(agents), **env)


def stats_table(text: str) -> dict[str, tuple[str, str]]:
    """``securecc stats``'s rows: label -> (since start, since reset)."""
    value = r"(\d+(?:\.\d)?(?: k?M?G?B)?)"
    rows = [re.fullmatch(rf"(\S.*?|  \S.*?)\s+{value}\s+{value}", line) for line in text.splitlines()[2:]]
    return {m[1]: (m[2], m[3]) for m in rows if m}


def stats(realm, workdir: Path, agents: Path, *args: str) -> dict[str, tuple[str, str]]:
    done = run(realm, None, workdir, agents, "stats", *args)
    assert done.returncode == 0 and done.stderr == b"", done.stderr
    return stats_table(done.stdout.decode())


def test_counters_move_with_remote_local_and_fallback_jobs_and_reset(realm, server, workdir, agents):
    """One remote job, one kept local by policy, one that falls back (host unreachable), a link; then -z."""
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")
    (workdir / "m.c").write_text("int main(void) { return 0; }\n")
    assert run(realm, server, workdir, agents, "gcc", "-c", "a.c").returncode == 0
    table = stats(realm, workdir, agents)
    assert table["compiled remotely"] == ("1", "1")
    assert table["Kerberos handshakes (new sessions)"] == ("1", "1")
    assert table["bytes sent to servers"][0] != "0 B" and table["bytes received from servers"][0] != "0 B"
    assert run(realm, server, workdir, agents, "gcc", "-c", "-Wa,-adhln=a.lst", "a.c").returncode == 0
    dead = f"127.0.0.1:{free_port()},principal=securecc/localhost@TEST.REALM"
    fallback = run(realm, None, workdir, agents, "gcc", "-c", "a.c", hosts=dead)
    assert fallback.returncode == 0 and b"compiling locally" in fallback.stderr
    assert run(realm, server, workdir, agents, "gcc", "m.c", "-o", "m").returncode == 0
    table = stats(realm, workdir, agents)
    assert table["compiled remotely"] == ("1", "1")
    assert table["kept local by policy"] == table["  option -Wa,..."] == ("1", "1")
    assert table["fell back to local after a failure"] == table["  unreachable"] == ("1", "1")
    assert table["  not a compile (link, gcc -v...)"] == ("1", "1")

    done = run(realm, None, workdir, agents, "stats", "-z")
    assert done.returncode == 0 and done.stdout.startswith(b"securecc: counters reset")
    assert run(realm, server, workdir, agents, "gcc", "-c", "a.c").returncode == 0
    done = run(realm, None, workdir, agents, "stats")
    assert re.search(r"counters reset \d+ s ago", done.stdout.decode())
    table = stats_table(done.stdout.decode())
    assert table["compiled remotely"] == ("2", "1")
    assert table["  option -Wa,..."] == table["  unreachable"] == ("1", "0")
    assert table["Kerberos handshakes (new sessions)"] == ("1", "0")  # the session was kept


def test_stats_without_an_agent_says_so_and_starts_none(realm, workdir, agents):
    done = run(realm, None, workdir, agents, "stats")
    assert done.returncode == 1 and done.stdout == b""
    assert re.fullmatch(rb"securecc: no agent is running for this Kerberos environment .*\n", done.stderr)
    assert not list(agents.glob("*.sock"))
    done = run(realm, None, workdir, agents, "gcc", "-c", "x.c", "-save-temps")  # any job starts it
    assert list(agents.glob("*.sock"))
    done = run(realm, None, workdir, agents, "stats", "--bogus")
    assert done.returncode == 2 and done.stderr == b"securecc: usage: securecc stats [-z]   (-z resets the counters)\n"


def test_the_notice_comes_once_when_most_compiles_stay_local(realm, server, workdir, agents):
    """Six remote and five local: no notice; two more local: one line, naming the top reason; never again.
    Links, -E, gcc -v, stdin and configure's conftest.c never count."""
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")
    (workdir / "conftest.c").write_text("int main(void) { return 0; }\n")
    outputs = []

    def job(*args: str) -> None:
        done = run(realm, server, workdir, agents, "gcc", *args)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stderr.decode())

    for _ in range(12):  # what configure does: links, probes, test compiles with odd options
        job("conftest.c", "-o", "conftest")
        job("-c", "-save-temps", "conftest.c")
    job("-v")
    job("-E", "a.c")
    subprocess.run([BIN / "securecc", "gcc", "-c", "-x", "c", "-", "-o", "stdin.o"], input=b"int s;\n", cwd=workdir,
                   env={**realm.user_env("alice", workdir), "SECURECC_AGENT_DIR": str(agents)}, check=True)
    for _ in range(6):
        job("-c", "a.c")
    for _ in range(5):
        job("-c", "-save-temps", "a.c")
    assert not any(NOTICE.search(o) for o in outputs), outputs
    for _ in range(2):
        job("-c", "-Wa,-adhln=a.lst", "a.c")
    job("-c", "-save-temps", "a.c")
    notices = [(n, NOTICE.match(o)) for n, o in enumerate(outputs) if NOTICE.search(o)]
    assert len(notices) == 1 and len(NOTICE.findall("".join(outputs))) == 1, outputs
    ((n, notice),) = notices
    assert notice is not None, outputs[n]  # the first line of the job's stderr
    assert notice.groups() == ("7", "13", "option -save-temps", "5")
    assert n == len(outputs) - 2  # on the job that tipped it: the second -Wa,-adhln


def test_help_lists_every_variable_the_code_reads(realm, workdir, agents):
    """Every SECURECC_ name in securecc/*.py and bin/ is documented in --help, which starts no agent."""
    read = set()
    sources = [*(REPO / "securecc").glob("*.py"), *(p for p in (REPO / "bin").iterdir() if p.is_file())]
    for path in sources:
        read |= set(re.findall(r"SECURECC_[A-Z_]*[A-Z]", path.read_text(errors="replace")))
    assert {"SECURECC_HOSTS", "SECURECC_VERBOSE", "SECURECC_IO_TIMEOUT", "SECURECC_AGENT_IDLE"} <= read
    started = time.monotonic()
    done = run(realm, None, workdir, agents, "--help")
    assert time.monotonic() - started < 2
    assert done.returncode == 0 and done.stdout.startswith(b"usage: securecc COMPILER"), done.stderr
    documented = set(re.findall(r"^  (SECURECC_[A-Z_]+)", done.stdout.decode(), re.MULTILINE))
    assert read - documented == set(), "undocumented in bin/securecc_shim.py's HELP"
    assert run(realm, None, workdir, agents, "-h").stdout == done.stdout
    assert not agents.exists() or not list(agents.iterdir())


def test_version_is_the_package_version(realm, workdir, agents):
    done = run(realm, None, workdir, agents, "--version")
    assert done.returncode == 0 and done.stderr == b""
    assert done.stdout.decode() == f"securecc {package.__version__}\n"
    assert not agents.exists() or not list(agents.iterdir())


def test_as_gcc_the_own_commands_are_gccs(tmp_path):
    """Through a symlink named gcc, --version and stats are gcc's business."""
    (tmp_path / "gcc").symlink_to(BIN / "securecc")
    done = subprocess.run([tmp_path / "gcc", "--version"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0 and done.stdout.startswith("gcc"), done.stderr
    sys.path.insert(0, str(BIN))
    try:
        from securecc_shim import MASQUERADE_NAMES
    finally:
        sys.path.remove(str(BIN))
    assert set(MASQUERADE_NAMES) == client.MASQUERADE_NAMES


@pytest.mark.parametrize(("reason", "category"), [
    ("option -Wa,-v", "option -Wa,..."),
    ("option -march=native", "option -march=native"),
    ("option -fplugin=/opt/p/x.so", "option -fplugin=..."),
    ("option -B/opt/gcc", "option -B..."),
    ("includes /usr/local/include/x.h", "includes /usr/local/..."),
    ("response file @args.rsp", "response file ..."),
    ("2 source files", "several source files"),
    ("0 source files", "no source file"),
    ("source type '.s'", "source type ..."),
    ("source type .S", "source type .S"),
    ("-x assembler-with-cpp", "-x assembler-with-cpp"),
    ("--param max-inline-insns-auto=4", "--param max-inline-insns-auto=4"),
    ("uses __TIMESTAMP__", "uses __TIMESTAMP__"),
])
def test_local_reasons_have_short_stable_categories(reason, category):
    assert local_category(reason) == category


@pytest.mark.parametrize(("message", "category"), [
    ("build1 busy (4/4); build2 busy (8/8)", "busy everywhere"),
    ("build1 busy (4/4); cannot connect to build2:3637: Connection refused", "unreachable"),
    ("build1 did not answer within 8 s", "timed out"),
    ("the Kerberos KDC did not answer within 2 s", "KDC not answering"),
    ("cannot reach the Kerberos KDC: check the network and krb5.conf", "KDC not answering"),
    ("build1 refused the job: alice@TEST.REALM may not use this server", "refused"),
    ("no Kerberos ticket: run kinit (or point KRB5_CLIENT_KTNAME at a keytab)", "no Kerberos ticket"),
    ("no compile servers found in SECURECC_HOSTS; list them in SECURECC_HOSTS", "no servers configured"),
    ("every compile server is backed off after failures, or quarantined (see securecc --show-hosts)", "every server backed off"),
    ("the object from b1 (job 1f) is not the one compiled here: ...; b1 is quarantined until ... (it refused the report: no)",
     "result diverged"),
    ("cannot check the object from b1 (job 1f): the compile here failed (exit 1)", "check failed here"),
    ("something new", "other"),
])
def test_failures_have_short_categories(message, category):
    assert failure_category(message) == category


def test_what_is_local_by_nature_or_a_probe():
    assert natural_category(["a.o", "-o", "prog"], "not a compile-only command (-c or -S)") is not None
    assert natural_category(["-E", "a.c"], "option -E") is not None
    assert natural_category(["--version"], "option --version") is not None
    assert natural_category(["-c", "-x", "c", "-"], "source from standard input") is not None
    assert natural_category(["-c", "-save-temps", "a.c"], "option -save-temps") is None
    assert is_probe(["-c", "conftest.c"], "/build")
    assert is_probe(["-c", "src.c"], "/b/CMakeFiles/CMakeScratch/TryCompile-x")
    assert not is_probe(["-c", "src/a.c", "-o", "CMakeFiles/a.dir/a.c.o"], "/build")


def test_the_notice_threshold():
    """At least ten counted compiles and more than half local; once per agent, even after a reset."""
    stats = Stats()
    notices = [stats.job(Outcome("policy", "option -x", True)) for _ in range(9)]
    notices += [stats.job(Outcome("natural", "not a compile", False)) for _ in range(20)]
    assert notices == [None] * 29
    assert stats.job(Outcome("fallback", "refused", True)) == (
        "10 of the 10 compiles so far stayed local (mostly option -x: 9); "
        "SECURECC_VERBOSE=1 shows why for each job, `securecc stats` counts them")
    stats.reset()
    assert [stats.job(Outcome("policy", "option -x", True)) for _ in range(20)] == [None] * 20
    even = Stats()
    assert [even.job(Outcome(kind, "", True)) for kind in ["remote", "policy"] * 10] == [None] * 20
