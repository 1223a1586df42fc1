"""The fault campaign: four servers, a generated project, one fault per build, and what must still hold.

    .venv/bin/python bench/faults.py [--files 300] [--jobs 8] [--only NAME ...] [--record]

Run as root (a tmpfs is mounted for the full-disk fault) after ``scripts/setup``;
about 8 minutes on a 2-core machine.  A throwaway testrealm (MIT KDC and
slapd), four securecc-servers on loopback (result cache off, so every job
compiles; LDAP answers kept 3 s, so a build outlives them), alice with a
ticket from kinit, and ``make -jJOBS CC=f"{BIN}/securecc gcc"`` on a generated
C project of FILES files.

Faults, one build each: none (the reference), kill -9 of a server, SIGSTOP
of a server for 30 s, slapd stopped for 40 s once the servers' LDAP answers
have expired, the KDC stopped with the tickets cached, the KDC stopped with
a fresh ccache (a TGT and no service ticket), a server whose audit log's
tmpfs fills, SIGINT to make (then make again), every server down, and 8
concurrent ``make -jJOBS`` builds.  A stopped daemon gets SIGSTOP (it hangs,
as a frozen machine does: harder on clients than a refused connection).

After each build it checks that make succeeded; that every object is the
one a local gcc makes; that every job the client reports as remote (its
job id, from SECURECC_VERBOSE) is in exactly one server's audit log,
exactly once, with the object's sha256; that every log verifies; and that no
compile, sandbox or client process is left over.  It prints a table of the
wall times against the fault-free build (the load row: the 8 builds' wall
over 8) and, with ``--record``, writes it into bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from benchrealm import BIN, PRINCIPAL, REPO, Realm, free_port

from securecc.audit import load_public_key, records, verify

SANDBOX_UID = 65534
REMOTE = re.compile(r"^securecc: compiled (\S+) on (\S+) \(job (\w+)\)$", re.MULTILINE)
TARGET = 1.5  # no fault may cost more than this times the fault-free build
README_MARK = "<!-- faults.py table -->"


def source(n: int) -> str:
    """A file with some real work for gcc -O2 (~50 ms): loops, a switch, a struct, two libc headers."""
    return f"""#include <stdio.h>
#include <string.h>
struct rec{n} {{ int key[16]; double weight; char name[24]; }};
static int mix{n}(const struct rec{n} *r, int rounds) {{
    int total = {n};
    for (int i = 0; i < rounds; i++)
        for (int j = 0; j < 16; j++)
            total = total * 31 + (r->key[(i + j) & 15] ^ (j << (i & 7)));
    return total;
}}
static double scale{n}(double x, int k) {{
    switch (k & 7) {{
    case 0: return x * 1.5; case 1: return x / 3.0; case 2: return x - {n}.0; case 3: return x * x;
    case 4: return x + 0.25; case 5: return -x; case 6: return x * {n % 13 + 2}.0; default: return 0.0;
    }}
}}
int entry{n}(int seed, char *out, size_t size) {{
    struct rec{n} r;
    memset(&r, 0, sizeof r);
    for (int i = 0; i < 16; i++) r.key[i] = seed * (i + {n});
    r.weight = scale{n}((double)seed, seed);
    snprintf(r.name, sizeof r.name, "rec-{n}-%d", seed);
    snprintf(out, size, "%s %d %.3f", r.name, mix{n}(&r, 64), r.weight);
    return (int)strlen(out);
}}
"""


MAKEFILE = """\
OBJS := $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))
all: $(OBJS)
src/%.o: src/%.c
\t$(CC) -O2 -Wall -c $< -o $@
clean:
\trm -f src/*.o
"""


def project(top: Path, files: int) -> Path:
    where = top / "template"
    (where / "src").mkdir(parents=True)
    (where / "Makefile").write_text(MAKEFILE)
    for n in range(files):
        (where / "src" / f"f{n:03}.c").write_text(source(n))
    return where


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Server:
    name: str
    config: Path
    audit: Path
    host: str
    process: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        log = open(self.config.parent / "server.log", "ab")
        self.process = subprocess.Popen([BIN / "securecc-server", "--config", self.config], env=env, stdout=log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while b"securecc-server listening on" not in (self.config.parent / "server.log").read_bytes()[-4000:]:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"{self.name} did not start: {(self.config.parent / 'server.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def signal(self, number: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(number)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        with open(self.config.parent / "server.log", "ab") as log:
            log.write(b"--- killed by faults.py ---\n")

    def log_size(self) -> int:
        path = self.config.parent / "server.log"
        return path.stat().st_size if path.exists() else 0

    def log_since(self, offset: int) -> str:
        with open(self.config.parent / "server.log", "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def logs(self) -> list[Path]:
        return sorted(self.audit.parent.glob(self.audit.name + "*"))


@dataclass
class Farm:
    top: Path
    realm: Realm
    servers: list[Server] = field(default_factory=list)
    disk: Path | None = None  # the tmpfs of the last server's audit log

    @property
    def server_env(self) -> dict[str, str]:
        return {**os.environ, **self.realm.env}

    def add(self, name: str, audit_dir: Path | None = None) -> Server:
        config = yaml.safe_load((self.realm.dir / "securecc.yaml").read_text())
        work = self.top / name
        work.mkdir()
        os.chmod(work, 0o755)
        port = free_port()
        audit = (audit_dir or work) / "audit.jsonl"
        config.update(listen=f"127.0.0.1:{port}", slots=4)
        config.pop("cache", None)  # every job compiles: a cache hit would prove nothing about the fault
        config.pop("monitor", None)
        config["audit"] = {**config["audit"], "path": str(audit)}
        config["sandbox"] = {**config["sandbox"], "scratch": str(work / "scratch")}
        config["ldap"] = {**config["ldap"], "positive_ttl": 3, "negative_ttl": 3}
        (work / "securecc.yaml").write_text(yaml.safe_dump(config))
        server = Server(name, work / "securecc.yaml", audit, f"127.0.0.1:{port}/4{PRINCIPAL}")
        server.start(self.server_env)
        self.servers.append(server)
        return server

    @property
    def hosts(self) -> str:
        return " ".join(s.host for s in self.servers)

    def daemon(self, name: str) -> int:
        """The pid of the realm's krb5kdc or slapd."""
        for line in (self.realm.dir / "pids").read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == name:
                return int(parts[1])
        raise SystemExit(f"no {name} pid in {self.realm.dir / 'pids'}")


@dataclass
class Client:
    """alice at a terminal: a ticket from kinit in her ccache, no keytab, her own agent."""

    farm: Farm
    ccache: Path
    home: Path

    def kinit(self) -> None:
        self.home.mkdir(exist_ok=True)
        self.ccache.unlink(missing_ok=True)
        subprocess.run(["kinit", "-k", "-t", str(self.farm.realm.dir / "alice.keytab"), "alice"], check=True,
                       env={**self.farm.server_env, "KRB5CCNAME": f"FILE:{self.ccache}"}, capture_output=True)

    def env(self, hosts: str, state: Path) -> dict[str, str]:
        """Her environment for one build; ``state``: its back-off file (each build starts with none)."""
        env = {k: v for k, v in self.farm.server_env.items() if not k.startswith("SECURECC_")}
        env.pop("KRB5_CLIENT_KTNAME", None)
        return {**env, "KRB5CCNAME": f"FILE:{self.ccache}", "SECURECC_HOSTS": hosts, "SECURECC_VERBOSE": "1",
                "XDG_CACHE_HOME": str(state), "SECURECC_AGENT_DIR": str(self.home / "agent")}


@dataclass
class Build:
    """One make run's outcome."""

    directory: Path
    returncode: int
    wall: float
    stderr: str


def make(directory: Path, jobs: int, env: dict[str, str], compiler: str, interrupt_after: float | None = None) -> Build:
    subprocess.run(["make", "-s", "clean"], cwd=directory, check=True, capture_output=True)
    started = time.monotonic()
    process = subprocess.Popen(["make", "-s", f"-j{jobs}", f"CC={compiler}"], cwd=directory, env={**env, "PWD": str(directory)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    if interrupt_after is not None:
        time.sleep(interrupt_after)
        os.killpg(process.pid, signal.SIGINT)  # what ^C at the terminal does: make and every compile get it
    _, err = process.communicate()
    return Build(directory, process.returncode, time.monotonic() - started, err.decode(errors="replace"))


def copy(template: Path, top: Path, name: str) -> Path:
    target = top / name
    shutil.copytree(template, target)
    os.chmod(target, 0o755)
    return target


@dataclass
class Check:
    problems: list[str] = field(default_factory=list)
    remote: int = 0
    local: int = 0
    logs: dict[str, str] = field(default_factory=dict)  # what each server logged during the build

    def fail(self, message: str) -> None:
        self.problems.append(message)


def check(build: Build, reference: dict[str, str], farm: Farm, key: Path, result: Check) -> None:
    """Everything that must hold after a build, into ``result``."""
    if "not using the agent" in build.stderr:
        result.fail("the client ran without its agent")
    if build.returncode != 0:
        result.fail(f"make failed ({build.returncode}): {' / '.join(build.stderr.splitlines()[-3:])}")
    objects = sorted((build.directory / "src").glob("*.o"))
    for obj in objects:
        if reference.get(obj.name) != sha256(obj):
            result.fail(f"{obj.name} differs from the local build")
    if len(objects) != len(reference):
        result.fail(f"{len(objects)} objects, not {len(reference)}")
    recorded: dict[str, list[tuple[str, dict]]] = {}
    for server in farm.servers:
        for record in records(server.logs()):
            if record.get("event") == "job" and record.get("job_id"):
                recorded.setdefault(record["job_id"], []).append((server.name, record))
    remote = REMOTE.findall(build.stderr)
    result.remote += len(remote)
    result.local += len(reference) - len(remote)
    for source_path, _host, job_id in remote:
        found = recorded.get(job_id, [])
        obj = build.directory / (source_path[:-2] + ".o")
        if len(found) != 1:
            result.fail(f"job {job_id} ({source_path}) is in the audit logs {len(found)} times")
        elif obj.exists() and found[0][1].get("output_sha256") != sha256(obj):
            result.fail(f"job {job_id}: the audit record's output_sha256 is not {obj.name}'s")
    public = load_public_key(key)
    for server in farm.servers:
        running = server.process is not None and server.process.poll() is None
        report = verify(server.logs(), public, live=running)
        if not report.ok:
            result.fail(f"{server.name}'s audit log: {report.problem}")
    leftovers = leftover_processes(build.directory)
    if leftovers:
        result.fail(f"left over: {'; '.join(leftovers[:3])}")
    strays = [p.name for p in build.directory.rglob("*") if p.is_file() and not re.fullmatch(r"f\d+\.[co]|Makefile", p.name)]
    if strays:
        result.fail(f"stray files: {', '.join(strays[:3])}")


def leftover_processes(directory: Path, wait: float = 10.0) -> list[str]:
    """Compiles, sandboxes and shims still alive (after ``wait`` seconds of grace): the agents and the
    servers' job handlers are meant to live on."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if "\nState:\tZ" in status or "securecc.client.agent" in command or "securecc.server.handler" in command:
                continue
            sandboxed = f"\nUid:\t{SANDBOX_UID}\t" in status
            if (sandboxed or cwd.startswith(str(directory))) and command:
                fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
                found.append(f"pid {entry.name} (parent {fields.get('PPid')}, {fields.get('State')}): {command[:100]}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def later(seconds: float, action) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` but ``leave`` bytes."""
    free = os.statvfs(disk)
    filler = disk / "filler"
    subprocess.run(["fallocate", "-l", str(max(0, free.f_bavail * free.f_frsize - leave)), str(filler)], check=True)
    return filler


def use_up_headroom(server: Server, client: Client, work: Path, most: int = 200) -> None:
    """Tiny compiles against ``server`` alone until it refuses one for want of room in its audit log.

    What the log has allocated ahead lasts a few dozen records after its disk fills, and a build gives a
    server of four only its share of the jobs: without this, whether the build meets a full log at all
    depended on how its jobs happened to spread."""
    work.mkdir()
    (work / "tiny.c").write_text("int tiny;\n")
    env, start = client.env(server.host, work / "state"), server.log_size()
    for _ in range(most):
        subprocess.run([f"{BIN}/securecc", "gcc", "-c", "tiny.c"], cwd=work, env=env, capture_output=True, check=True)
        if "refusing jobs until it can be written" in server.log_since(start):
            return
    raise SystemExit(f"faults.py: {server.name} took {most} jobs with its audit log's disk full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--freeze", type=float, default=30, help="seconds a SIGSTOPped server stays stopped (30)")
    parser.add_argument("--ldap-outage", type=float, default=40, help="seconds slapd stays stopped (40)")
    parser.add_argument("--only", nargs="*", help="fault names to run (the fault-free build always runs)")
    parser.add_argument("--record", action="store_true", help="write the table into bench/README.md")
    parser.add_argument("--keep", action="store_true", help="leave the realm and the builds in place")
    options = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("faults.py: run as root (it mounts a tmpfs for the full-disk fault)")
    top = Path(tempfile.mkdtemp(prefix="faults-", dir="/tmp"))
    os.chmod(top, 0o755)
    realm = Realm(top / "realm")
    farm = Farm(top, realm)
    mount_tmpfs(top / "disk", "2m")
    farm.disk = top / "disk"
    try:
        rows = campaign(farm, options)
    finally:
        for server in farm.servers:
            server.stop()
        for name in ("krb5kdc", "slapd"):
            try:
                os.kill(farm.daemon(name), signal.SIGCONT)
            except (OSError, SystemExit):
                pass
        subprocess.run(["pkill", "-f", f"securecc.client.agent {top}"], check=False)
        realm.close()
        subprocess.run(["umount", "-l", str(top / "disk")], check=False)
        if not options.keep:
            shutil.rmtree(top, ignore_errors=True)
    table = render(rows, options)
    print(table)
    if options.record:
        record(table)
    if any(not row["ok"] for row in rows):
        sys.exit(1)


def campaign(farm: Farm, options: argparse.Namespace) -> list[dict]:
    top, jobs = farm.top, options.jobs
    for n in range(3):
        farm.add(f"server{n}")
    farm.add("server3", audit_dir=farm.disk)
    key = farm.realm.dir / "audit.key.pub"
    template = project(top, options.files)
    client = Client(farm, top / "alice.ccache", top / "alice-home")
    client.kinit()

    local_dir = copy(template, top, "local")
    make(local_dir, jobs, {**os.environ}, "gcc")  # warm: gcc, the headers and the page cache
    local = make(local_dir, jobs, {**os.environ}, "gcc")
    if local.returncode != 0:
        raise SystemExit(f"the local build failed: {local.stderr[-2000:]}")
    reference = {p.name: sha256(p) for p in (local_dir / "src").glob("*.o")}
    rows: list[dict] = []
    runs = 0

    def run(name: str, fault=None, after=None, env: Client | None = None, interrupt: float | None = None, repeat_after_interrupt=False):
        nonlocal runs
        runs += 1
        directory = copy(template, top, f"build{runs}-{name}")
        environment = (env or client).env(farm.hosts, top / f"state{runs}")
        leftovers: list[str] = []
        logged = {server.name: server.log_size() for server in farm.servers}
        timers = fault() if fault else []
        build = make(directory, jobs, environment, f"{BIN}/securecc gcc", interrupt)
        wall = build.wall
        if repeat_after_interrupt:
            leftovers = leftover_processes(directory)
            again = make_again(directory, jobs, environment)
            wall += again.wall
            build = Build(directory, again.returncode, wall, build.stderr + again.stderr)
        for timer in timers or []:
            timer.join()
        if after:
            after()
        result = Check()
        if repeat_after_interrupt and leftovers:
            result.fail(f"left over after ^C: {'; '.join(leftovers[:3])}")
        check(build, reference, farm, key, result)
        result.logs = {server.name: server.log_since(logged[server.name]) for server in farm.servers}
        return build, result

    def row(name: str, build: Build, result: Check, wall: float | None = None, limit: str = "build") -> None:
        rows.append({"fault": name, "wall": wall if wall is not None else build.wall, "remote": result.remote,
                     "local": result.local, "problems": result.problems, "limit": limit, "ok": not result.problems})
        state = "ok" if not result.problems else "FAILED: " + "; ".join(result.problems[:3])
        print(f"faults.py: {name}: {rows[-1]['wall']:.1f} s, {result.remote} remote, {state}", file=sys.stderr, flush=True)

    wanted = set(options.only or [])

    def chosen(name: str) -> bool:
        return not wanted or name in wanted

    run("warm-up")  # page cache, the agent, the service tickets
    build, result = run("none")
    row("none", build, result)
    rows[-1]["local_wall"] = local.wall

    if chosen("kill-9"):
        victim = farm.servers[0]
        build, result = run("kill-9", fault=lambda: [later(2, victim.kill)], after=lambda: victim.start(farm.server_env))
        row("kill -9 of a server", build, result)
    if chosen("sigstop"):
        victim = farm.servers[1]

        def freeze():
            return [later(2, lambda: victim.signal(signal.SIGSTOP)),
                    later(2 + options.freeze, lambda: victim.signal(signal.SIGCONT))]

        build, result = run("sigstop", fault=freeze)
        row(f"SIGSTOP of a server for {options.freeze:g} s", build, result)
    if chosen("slapd"):
        slapd = farm.daemon("slapd")

        def ldap_down():
            time.sleep(4)  # the servers' LDAP answers (kept 3 s) have expired
            os.kill(slapd, signal.SIGSTOP)
            return [later(options.ldap_outage, lambda: os.kill(slapd, signal.SIGCONT))]

        build, result = run("slapd", fault=ldap_down)
        row(f"slapd down {options.ldap_outage:g} s, answers expired", build, result)
    if chosen("kdc-cached"):
        kdc = farm.daemon("krb5kdc")

        def kdc_down():
            os.kill(kdc, signal.SIGSTOP)
            return []

        build, result = run("kdc-cached", fault=kdc_down, after=lambda: os.kill(kdc, signal.SIGCONT))
        row("KDC down, tickets cached", build, result)
    if chosen("kdc-fresh"):
        kdc = farm.daemon("krb5kdc")
        fresh = Client(farm, top / "fresh.ccache", top / "fresh-home")
        fresh.kinit()  # a TGT, and no service ticket yet

        def kdc_down_fresh():
            os.kill(kdc, signal.SIGSTOP)
            return []

        build, result = run("kdc-fresh", fault=kdc_down_fresh, env=fresh,
                            after=lambda: os.kill(kdc, signal.SIGCONT))
        row("KDC down, fresh ccache (no ticket)", build, result, limit="local")
    if chosen("full-disk"):
        assert farm.disk is not None
        filler: list[Path] = []

        def disk_fills():
            filler.append(fill(farm.disk, 0))
            use_up_headroom(next(s for s in farm.servers if s.name == "server3"), client, top / "headroom")
            return []

        build, result = run("full-disk", fault=disk_fills, after=lambda: filler[0].unlink())
        refused = result.logs["server3"].count("refusing jobs until it can be written")
        if not refused:
            result.fail("the disk never filled: no job was refused for want of room")
        row(f"audit log's tmpfs fills ({refused} jobs turned away)", build, result)
    if chosen("sigint"):
        build, result = run("sigint", interrupt=3.0, repeat_after_interrupt=True)
        row("SIGINT to make, then make again", build, result)
    if chosen("all-down"):

        def all_down():
            for server in farm.servers:
                server.stop()
            return []

        def all_up() -> None:
            for server in farm.servers:
                server.start(farm.server_env)

        build, result = run("all-down", fault=all_down, after=all_up)
        row("all servers down", build, result, limit="local")
    if chosen("load"):
        builds = [copy(template, top, f"load{n}") for n in range(8)]
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            done = list(pool.map(lambda d: make(d, jobs, client.env(farm.hosts, top / f"state-{d.name}"), f"{BIN}/securecc gcc"), builds))
        wall = time.monotonic() - started
        total = Check()
        for each in done:
            check(each, reference, farm, key, total)
        row(f"8 concurrent make -j{jobs} (wall / 8)", done[0], total, wall=wall / 8)
    for server in farm.servers:  # a clean stop signs every log: verify them whole
        server.stop()
    public = load_public_key(key)
    stopped = Check()
    for server in farm.servers:
        report = verify(server.logs(), public)
        if not report.ok:
            stopped.fail(f"{server.name}: {report.problem}")
    rows.append({"fault": "every server stopped: each log verifies whole", "wall": None, "remote": 0, "local": 0,
                 "problems": stopped.problems, "limit": "none", "ok": not stopped.problems})
    return rows


def make_again(directory: Path, jobs: int, env: dict[str, str]) -> Build:
    """make after an interrupted make: what is missing is built, and what ^C left half-written must not count."""
    started = time.monotonic()
    done = subprocess.run(["make", "-s", f"-j{jobs}", f"CC={BIN}/securecc gcc"], cwd=directory, env={**env, "PWD": str(directory)},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Build(directory, done.returncode, time.monotonic() - started, done.stderr.decode(errors="replace"))


def render(rows: list[dict], options: argparse.Namespace) -> str:
    base = rows[0]["wall"]
    local = rows[0].get("local_wall", 0.0)
    lines = [
        f"{options.files} files, make -j{options.jobs}, 4 servers on loopback (this machine: {os.cpu_count()} cores); "
        f"fault-free build {base:.1f} s, local gcc {local:.1f} s.",
        "",
        "| fault | wall | × fault-free | remote jobs | target | checks |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["wall"] is None:
            lines.append(f"| {r['fault']} | | | | | {'ok' if r['ok'] else 'FAILED: ' + '; '.join(r['problems'][:3])} |")
            continue
        ratio = r["wall"] / base
        if r["limit"] == "local":
            target, met = f"≤ local ({local:.1f} s)", r["wall"] <= local * 1.05
        else:
            target, met = f"≤ {TARGET}×", ratio <= TARGET
        checks = "ok" if r["ok"] else "FAILED: " + "; ".join(r["problems"][:3])
        lines.append(f"| {r['fault']} | {r['wall']:.1f} s | {ratio:.2f} | {r['remote']} | {target}: "
                     f"{'met' if met else 'missed'} | {checks} |")
    return "\n".join(lines)


def record(table: str) -> None:
    readme = REPO / "bench" / "README.md"
    text = readme.read_text()
    stamp = time.strftime("%Y-%m-%d")
    block = f"{README_MARK}\nLatest run ({stamp}):\n\n{table}\n{README_MARK}"
    if text.count(README_MARK) == 2:
        before, _, rest = text.partition(README_MARK)
        _, _, after = rest.partition(README_MARK)
        text = before + block + after
    else:
        text += f"\n## Faults (`bench/faults.py`)\n\n{block}\n"
    readme.write_text(text)


if __name__ == "__main__":
    main()
