"""The result cache: Bob reuses Alice's compile; keys, time macros, corruption, poisoning, concurrency, eviction."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import BIN, local, make_job, securecc
from test_hosts import build, project, spec

from securecc import cachekey
from securecc import protocol as wire
from securecc.cachekey import cache_key, expands_time, uncacheable
from securecc.server.cache import Entry, ResultCache

JOB = wire.Job("gcc", ["-O2"], "c", "-c", "/src", "a.c", b"int a;\n", environment={"LC_ALL": "C"})


def test_key_covers_everything_that_changes_the_output():
    """Compiler identity, flags, macros or headers (the text), environment, paths: each changes the key."""
    base = cache_key("gcc 12", JOB)
    assert cache_key("gcc 12", dataclasses.replace(JOB)) == base
    variants = [
        cache_key("gcc 13", JOB),
        cache_key("gcc 12", dataclasses.replace(JOB, args=["-O1"])),
        cache_key("gcc 12", dataclasses.replace(JOB, source=b"int a = 1;\n")),  # a macro or a header changed the text
        cache_key("gcc 12", dataclasses.replace(JOB, environment={"LC_ALL": "C", "SOURCE_DATE_EPOCH": "1"})),
        cache_key("gcc 12", dataclasses.replace(JOB, cwd="/other")),
        cache_key("gcc 12", dataclasses.replace(JOB, source_path="b.c")),
        cache_key("gcc 12", dataclasses.replace(JOB, mode="-S")),
        cache_key("gcc 12", dataclasses.replace(JOB, language="c++")),
        cache_key("gcc 12", dataclasses.replace(JOB, include_paths=["/src/h.h"], includes=[b"x"])),
        cache_key("gcc 12", dataclasses.replace(JOB, include_paths=["/src/h.h"], includes=[b"y"])),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_entries_are_checked_bounded_and_crash_safe(tmp_path):
    """A flipped byte or a cut entry is dropped, never served; leftovers of a crash go; LRU keeps the bound."""
    cache = ResultCache(tmp_path / "c", max_bytes=10_000)
    entry = Entry(b"", b"warning\n", b"\x7fELF" + b"x" * 3000, {"job_id": "j1"})
    cache.put("aa" + "1" * 62, entry)
    assert cache.get("aa" + "1" * 62) == entry
    path = tmp_path / "c" / "aa" / ("aa" + "1" * 62)
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    assert cache.get("aa" + "1" * 62) is None and not path.exists() and cache.corrupt == 1
    cache.put("bb" + "2" * 62, entry)
    cut = tmp_path / "c" / "bb" / ("bb" + "2" * 62)
    cut.write_bytes(cut.read_bytes()[:-100])
    assert cache.get("bb" + "2" * 62) is None
    (tmp_path / "c" / "bb" / "leftover.123.tmp").write_bytes(b"half")
    ResultCache(tmp_path / "c", max_bytes=10_000)
    assert not (tmp_path / "c" / "bb" / "leftover.123.tmp").exists()
    for n in range(5):
        cache.put(f"{n:02d}" + "3" * 62, entry)
        time.sleep(0.01)
    remaining = sorted(p.name[:2] for p in (tmp_path / "c").glob("*/*"))
    assert remaining == ["02", "03", "04"]  # 3 x ~3 KB fit in 10 KB; the oldest went


def acl_with_bob(directory: Path) -> str:
    path = directory / "acl.yaml"
    path.write_text("realms: [TEST.REALM]\nallow:\n  - group: committers\n  - principal: bob\n")
    return str(path)


def test_bob_reuses_alices_compiles(realm, own_server, workdir):
    """Alice builds a tree; Bob's build of it is served from the cache, audited as hits, objects exact."""
    names = project(workdir, files=8)
    s = own_server(acl=acl_with_bob(workdir), slots=8)
    _, done = build(realm, workdir, spec(s))
    assert done.returncode == 0, done.stderr
    stored = {r["source"]: r["job_id"] for r in s.jobs(principal="alice@TEST.REALM") if r.get("cache") == "stored"}
    assert len(stored) == len(names)
    environment = realm.user_env("bob", workdir)
    environment.update(SECURECC_HOSTS=spec(s), PWD=str(workdir), XDG_CACHE_HOME=str(workdir / ".cache-bob"))
    subprocess.run(["make", "-s", "clean"], cwd=workdir)
    for o in workdir.glob("*.o"):
        o.unlink()
    bob = subprocess.run(["make", "-j4", f"CC={BIN}/securecc gcc"], cwd=workdir, env=environment, capture_output=True)
    assert bob.returncode == 0, bob.stderr
    hits = s.jobs(principal="bob@TEST.REALM", cache="hit")
    assert len(hits) == len(names)
    assert {h["source"]: h["cached_from"] for h in hits} == stored
    for n in names:
        local(workdir, "gcc", "-g", "-O2", "-c", f"{n}.c", "-o", f"{n}.local")
        assert (workdir / f"{n}.o").read_bytes() == (workdir / f"{n}.local").read_bytes()


def test_corrupt_entry_is_recompiled(realm, own_server, workdir):
    """An entry damaged on disk is detected on read and the job compiles again, correctly."""
    s = own_server()
    (workdir / "a.c").write_text("int a(int x) { return x * 7; }\n")
    assert securecc(realm, s, "alice", workdir, "gcc", "-O2", "-c", "a.c", "-o", "first.o").returncode == 0

    def entries() -> list[Path]:  # the handler stores the entry after the reply: wait for its rename
        return [p for p in (Path(s.config_path.parent) / "cache").glob("*/*") if not p.name.endswith(".tmp")]

    deadline = time.monotonic() + 10
    while not entries() and time.monotonic() < deadline:
        time.sleep(0.05)
    (entry,) = entries()
    data = bytearray(entry.read_bytes())
    data[-10] ^= 0xFF
    entry.write_bytes(bytes(data))
    done = securecc(realm, s, "alice", workdir, "gcc", "-O2", "-c", "a.c", "-o", "second.o", SECURECC_VERBOSE="1")
    assert b"compiled a.c" in done.stderr
    assert (workdir / "second.o").read_bytes() == (workdir / "first.o").read_bytes()
    records = s.jobs(principal="alice@TEST.REALM", source="a.c")
    assert [r.get("cache") for r in records] == ["stored", "stored"]


def test_identical_jobs_at_once_compile_once(realm, own_server, workdir, monkeypatch):
    """Two identical jobs at the same time: one compiles, the other waits for it and is served; both exact."""
    s = own_server()
    source = b"".join(b"int f%d(int x) { return x * %d; }\n" % (n, n) for n in range(3000))
    job = make_job("gcc", ["-O2"], "c", "-c", str(workdir), "big.c", source)
    replies: list[wire.Message] = []

    def run() -> None:
        from test_acl import credentials_for

        from securecc.client.channel import Channel
        from securecc.client.hosts import parse_hosts

        channel = Channel(parse_hosts(s.hosts)[0])
        channel.authenticate(credentials_for(realm, "alice"))
        replies.append(channel.call(job))
        channel.close()

    for key, value in realm.user_env("alice", workdir).items():
        monkeypatch.setenv(key, value)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(replies) == 2 and all(isinstance(r, wire.Result) and r.exit_status == 0 for r in replies)
    assert replies[0].output == replies[1].output
    kinds = sorted(r.get("cache") for r in s.jobs(source="big.c"))
    assert kinds == ["hit", "stored"]


def test_cache_is_out_of_the_sandbox_reach(realm, own_server, workdir):
    """Only the server writes entries: the cache belongs to the job handler (0700), which the front never
    lets a client write into, and it is absent from the sandbox."""
    s = own_server()
    (workdir / "a.c").write_text("int a;\n")
    securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")
    cache_dir = Path(s.config_path.parent) / "cache"
    handler_uid = 65534 if os.geteuid() == 0 else os.geteuid()
    assert os.stat(cache_dir).st_mode & 0o777 == 0o700 and os.stat(cache_dir).st_uid == handler_uid
    log = s.log_path.read_text()
    assert str(cache_dir) not in log
    from securecc import sandbox

    spec_ = sandbox.Spec("/usr/bin/gcc", ["-c"], workdir, str(workdir), "a.c", {})
    assert not any(str(cache_dir) in arg for arg in sandbox.command(spec_, sandbox.Settings(sandbox.Limits(), None, None)))


def test_affinity_sends_identical_jobs_to_the_same_server(realm, own_server, workdir):
    """With several servers, each job's owner (rendezvous hash) gets it from everyone: Bob hits Alice's entries."""
    names = project(workdir, files=8)
    acl = acl_with_bob(workdir)
    servers = [own_server(acl=acl, slots=8) for _ in range(3)]
    hosts = " ".join(spec(s) for s in servers)
    _, done = build(realm, workdir, hosts)
    assert done.returncode == 0
    environment = realm.user_env("bob", workdir)
    environment.update(SECURECC_HOSTS=hosts, PWD=str(workdir), XDG_CACHE_HOME=str(workdir / ".cache-bob"))
    for o in workdir.glob("*.o"):
        o.unlink()
    bob = subprocess.run(["make", "-j4", f"CC={BIN}/securecc gcc"], cwd=workdir, env=environment, capture_output=True)
    assert bob.returncode == 0
    hits = sum(len(s.jobs(principal="bob@TEST.REALM", cache="hit")) for s in servers)
    assert hits == len(names)
    assert sum(bool(s.jobs(principal="alice@TEST.REALM")) for s in servers) >= 2  # the work was spread


# Sources whose compile expands a time macro, each spelt another way; gcc itself confirms (-Wdate-time).
CAT = b"#define CAT(a, b) a ## b\n"
DATED = {
    "date": b"const char *d = __DATE__;\n",
    "time-in-a-macro": b"#define WHEN __TIME__\nconst char *w = WHEN;\n",
    "timestamp": b"const char *s = __TIMESTAMP__;\n",
    "pasted": CAT + b"const char *d = CAT(__DA, TE__);\n",
    "pasted-underscores": CAT + b"const char *t = CAT(__, TIME__);\n",
    "pasted-digraph": b"#define CAT(a, b) a %:%: b\nconst char *t = CAT(__TI, ME__);\n",
    "pasted-in-the-body": b"#define D __DA ## TE__\nconst char *d = D;\n",
    "pasted-three": b"#define CAT3(a, b, c) a ## b ## c\nconst char *d = CAT3(__, DATE, __);\n",
    "pasted-through-a-wrapper": CAT + b"#define X(a, b) CAT(a, b)\n#define H __DA\nconst char *d = X(H, TE__);\n",
    "glibc-concat": b"#include <sys/cdefs.h>\nconst char *t = __CONCAT(__TIMES, TAMP__);\n",  # no ## in the job
    "spliced": b"const char *d = __DA\\\nTE__;\n",
    "spliced-after-blanks": b"const char *d = __DA\\  \nTE__;\n",
    "spliced-trigraph": b"const char *d = __DA?" b"?/\nTE__;\n",
    "spliced-paste": b"#define CAT(a, b) a #\\\n# b\nconst char *d = CAT(__DA, TE__);\n",
}


def expansions(text: bytes) -> int:
    """How many time macros gcc expands compiling ``text`` (as C11: trigraphs on)."""
    done = subprocess.run(["gcc", "-std=c11", "-Wdate-time", "-E", "-x", "c", "-o", "/dev/null", "-"], input=text,
                          capture_output=True, env={**os.environ, "LC_ALL": "C"}, check=True)
    return done.stderr.count(b"might prevent reproducible builds")


@pytest.mark.parametrize("text", DATED.values(), ids=DATED.keys())
def test_a_job_that_expands_a_time_macro_is_not_cached(text):
    """Spelt out, pasted, spliced: yesterday's __DATE__ must not be served today, so the job has no key."""
    assert expansions(text) >= 1
    job = dataclasses.replace(JOB, source=text)
    assert uncacheable(job) and expands_time(job)


@pytest.mark.parametrize("text", DATED.values(), ids=DATED.keys())
def test_what_the_server_remembers_of_a_header_is_judged_as_the_first_time(text):
    """The pieces of each text are remembered by its bytes (the next job sends the same headers): a text seen
    before, in a header or as the source, judges a job as the first time did, alone or split across two texts."""
    as_header = dataclasses.replace(JOB, source=b'#include "h.h"\n', include_paths=["/src/h.h"], includes=[text])
    assert uncacheable(as_header) == uncacheable(as_header) == uncacheable(dataclasses.replace(JOB, source=text))
    cut = len(text) // 2
    halves = dataclasses.replace(JOB, source=text[:cut] + b"\n", include_paths=["/src/h.h"], includes=[b"\n" + text[cut:]])
    assert uncacheable(halves) == uncacheable(halves)
    assert uncacheable(dataclasses.replace(JOB, source=b"int x;\n", include_paths=["/src/h.h"], includes=[b"int y;\n"])) is None


def test_what_the_server_remembers_is_bounded():
    """However many texts pass (an authenticated client may send any), at most REMEMBERED_BYTES are kept, and a
    larger text than REMEMBERED_TEXT is judged without being kept."""
    remembered = cachekey._Remembered()
    for n in range(40):
        remembered.found(b"int DATE_%d[%d];\n" % (n, n) * (cachekey.REMEMBERED_BYTES // 20 // 16))
    assert remembered._bytes <= cachekey.REMEMBERED_BYTES and len(remembered._found) < 40
    big = b"const char *d = __DA ## TE__;\n" + b" " * cachekey.REMEMBERED_TEXT
    assert remembered.found(big)[1] >= {b"__DA", b"TE__"} and big not in remembered._found


def test_the_macro_counts_wherever_the_compile_reads_it():
    """The original, any header sent, a -D argument (joined or separate): each is part of the compile."""
    header = CAT + b"#define WHEN CAT(__TI, ME__)\n"
    source = b'#include "h.h"\nconst char *w = WHEN;\n'
    jobs = [
        dataclasses.replace(JOB, original=DATED["date"]),
        dataclasses.replace(JOB, source=source, include_paths=["/src/h.h"], includes=[header]),
        dataclasses.replace(JOB, source=b"const char *w = WHEN;\n", args=["-O2", "-DWHEN=__DATE__"]),
        dataclasses.replace(JOB, source=b"const char *w = WHEN;\n", args=["-D", "WHEN=__DATE__"]),
        dataclasses.replace(JOB, source=CAT + b"const char *w = CAT(__DA, WHEN);\n", args=["-DWHEN=TE__"]),
        dataclasses.replace(JOB, source=b"const char *w = CAT(__DA, TE__);\n", args=["-DCAT(a,b)=a##b"]),
    ]
    assert [bool(uncacheable(job)) for job in jobs] == [True] * len(jobs)


def test_source_date_epoch_pins_date_and_time_but_not_timestamp(tmp_path):
    """gcc takes __DATE__/__TIME__ from SOURCE_DATE_EPOCH (keyed), __TIMESTAMP__ from the file's mtime."""
    for name in ("date", "time-in-a-macro", "pasted", "spliced"):
        job = dataclasses.replace(JOB, source=DATED[name], environment={"LC_ALL": "C", "SOURCE_DATE_EPOCH": "0"})
        assert uncacheable(job) is None, name
        later = dataclasses.replace(job, environment={"LC_ALL": "C", "SOURCE_DATE_EPOCH": "86400"})
        assert cache_key("gcc 12", later) != cache_key("gcc 12", job)
    for name in ("timestamp", "glibc-concat"):
        assert uncacheable(dataclasses.replace(JOB, source=DATED[name], environment={"SOURCE_DATE_EPOCH": "0"})), name
    (tmp_path / "s.c").write_bytes(DATED["timestamp"])
    pinned = local(tmp_path, "gcc", "-E", "-P", "s.c", SOURCE_DATE_EPOCH="0", LC_ALL="C")
    assert b"1970" not in pinned.stdout and b"__TIMESTAMP__" not in pinned.stdout  # unpinned, as assumed
    for junk in ("", "soon", "1e9", "\u0661"):  # gcc does not honour these: not pinned
        assert uncacheable(dataclasses.replace(JOB, source=DATED["date"], environment={"SOURCE_DATE_EPOCH": junk}))


def test_lookalikes_without_a_possible_paste_stay_cacheable():
    """A longer name, or parts that no three identifiers spell, do not cost the cache."""
    for text in (b"int UPDATE__, DATE_, __DAT;\n", CAT + b"int CAT(x, DATE), __TIMER;\n", b"int TIME, __STAMP__;\n"):
        assert uncacheable(dataclasses.replace(JOB, source=text)) is None, text


@pytest.mark.parametrize("compiler, text", [
    ("gcc", b"".join(b"#include <%s.h>\n" % h for h in b"stdio stdlib string time pthread math sys/socket".split())),
    ("g++", b"".join(b"#include <%s>\n" % h for h in b"vector string iostream map memory regex chrono thread".split())),
])
def test_ordinary_code_stays_cacheable(tmp_path, compiler, text):
    """A -fdirectives-only text with the C library's or libstdc++'s headers (full of ## and short names) is cached."""
    (tmp_path / "a.c").write_bytes(text + b"int main(void) { return 0; }\n")
    language = "c" if compiler == "gcc" else "c++"
    done = local(tmp_path, compiler, "-x", language, "-E", "-fdirectives-only", "a.c")
    assert done.returncode == 0, done.stderr
    job = dataclasses.replace(JOB, compiler=compiler, language=language, source=done.stdout)
    assert uncacheable(job) is None
    # The raw source for a server that preprocesses, too (its headers are the server's own /usr).
    assert uncacheable(dataclasses.replace(job, source=text)) is None


def test_the_server_neither_looks_up_nor_stores_a_dated_compile(realm, own_server, workdir):
    """Through the real server: a dated object is compiled every time, a pinned or undated one is reused."""
    s = own_server()
    (workdir / "dated.c").write_bytes(b"#include <stdio.h>\n" + DATED["pasted"])
    (workdir / "plain.c").write_bytes(b"#include <stdio.h>\nint plain(void) { return puts(\"x\"); }\n")
    for _ in range(2):
        for name, extra in (("dated", {}), ("plain", {}), ("pinned", {"SOURCE_DATE_EPOCH": "86400"})):
            source = "plain.c" if name == "plain" else "dated.c"
            done = securecc(realm, s, "alice", workdir, "gcc", "-c", source, "-o", f"{name}.o", **extra)
            assert done.returncode == 0, done.stderr
    kinds = {name: [r.get("cache") for r in s.jobs(principal="alice@TEST.REALM", source=name)]
             for name in ("dated.c", "plain.c")}
    assert kinds["plain.c"] == ["stored", "hit"]
    assert kinds["dated.c"] == [None, "stored", None, "hit"]  # unpinned, pinned, unpinned, pinned
    pinned = local(workdir, "gcc", "-c", "dated.c", "-o", "local.o", SOURCE_DATE_EPOCH="86400")
    assert pinned.returncode == 0 and (workdir / "pinned.o").read_bytes() == (workdir / "local.o").read_bytes()
