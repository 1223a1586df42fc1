"""securecc: the compiler wrapper (``securecc gcc ARGS`` or a symlink named gcc); ``bin/securecc`` runs this.

scripts/setup installs ``bin/securecc.c`` as ``securecc``: a C shim that speaks
this file's protocol to a running agent and runs this one (``securecc-py``) for
everything else, so this is the reference and the fallback.

This runs once per compile, thousands of times a build, so it is the
smallest thing that can hand the job over: it passes argv, the working
directory and the environment to the user's securecc agent
(:mod:`securecc.client.agent`, started here on first use) over a Unix socket in a
private directory, then prints what the agent answers and exits with its
status, or runs the local compiler when the agent says so.  What goes over
the socket is described once, in :mod:`securecc.client.agent_wire`.  Standard
library built-ins only and no ``site`` (``-S``): 8 ms of interpreter start
instead of 21 ms for a console-script wrapper in a virtualenv.  It is a
module next to the script so that its bytecode is cached (compiling it
would cost 1.5 ms per run).

``securecc stats``, ``--help`` and ``--version`` are answered here too,
without starting an agent: stats asks a running one, if any.

Anything unusual (no agent, a directory that is not private, an agent of
another version or Kerberos environment, an agent that dies mid-job) falls
back to doing the whole job here (:mod:`securecc.client.job`, "direct mode"),
so the agent can only make a build faster, never break it.
SECURECC_AGENT=off always uses direct mode.
"""

import _signal  # signal.py would cost 3.6 ms (enum); the built-in module does the same
import _socket  # socket.py would cost 5 ms of imports; the C module is all a Unix socket needs
import posix  # os.py would cost 1.5 ms of imports (it is not loaded without site); the built-in has all we use
import sys

_signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # ^C kills us the way it kills gcc

AGENT_PROTOCOL = b"securecc-agent 2"  # securecc.client.agent_wire.PROTOCOL
START_WAIT = 5.0  # seconds to wait for a freshly started agent (a cold Python start on a loaded box)
ENVIRON = posix.environ  # bytes to bytes, as the kernel gave it
MASQUERADE_NAMES = ("gcc", "cc", "g++", "c++", "clang", "clang++")  # securecc.client.job's: all args are the compiler's
OWN_COMMANDS = ("stats", "--help", "-h", "--version")
NO_AGENT = b"securecc: no agent is running for this Kerberos environment (the first compile starts one); no counters\n"

HELP = b"""\
usage: securecc COMPILER [ARGS...]   (or through a symlink named gcc, cc, g++, c++, clang or clang++)
       securecc stats [-z]    the agent's counters: since it started, since the last -z (resets)
       securecc --show-hosts  the compile servers, where they came from, back-off and latency
       securecc doctor [--strict]  check ticket, agent directory, hosts, each server; --strict: fail
                              when compiles would stay local (for CI)
       securecc --version | --help

Environment:
  SECURECC_HOSTS              compile servers: host[:port][/limit][,principal=NAME] ...; default:
                              ~/.config/securecc/hosts, /etc/securecc/hosts, DNS SRV records
  SECURECC_DOMAIN             the domain of the SRV records (default: the resolver's search list)
  SECURECC_DNS                HOST:PORT of the DNS server to ask for them
  SECURECC_VERBOSE=1          one line per job: where it was compiled, or why it stayed local
  SECURECC_CONNECT_TIMEOUT    seconds to connect to a server (2)
  SECURECC_HANDSHAKE_TIMEOUT  seconds for the Kerberos handshake (5)
  SECURECC_KDC_TIMEOUT        seconds to wait for a service ticket from the KDC (2); while the KDC
                              does not answer, only tickets already cached are used
  SECURECC_IO_TIMEOUT         seconds of silence after which a server is taken as hung (8)
  SECURECC_BACKOFF            seconds a failing server is left alone, doubling up to 300 (15)
  SECURECC_AGENT=off          no agent: every securecc process does its job itself
  SECURECC_FALLBACK=0         a compile that should go remote but cannot (no ticket, no server
                              answering, refused) fails with the reason instead of compiling here
  SECURECC_PROVENANCE=DIR     one in-toto statement per object received, DIR/<sha256>.json, with
                              the servers' signed statements (securecc-audit provenance OBJECT)
  SECURECC_VERIFY_RATE        the share of remote jobs compiled here too and compared (0.01); a
                              server whose object differs is quarantined (securecc-hosts --clear)
  SECURECC_AGENT_DIR          the agent's socket and log (default: $XDG_RUNTIME_DIR/securecc,
                              else /tmp/securecc-UID)
  SECURECC_AGENT_IDLE         seconds without a job after which the agent exits (600)
  SECURECC_CONFIG             securecc-admin's server config (/etc/securecc/securecc.yaml)
Also read: KRB5CCNAME and the other KRB5* (your ticket; one agent per set of values),
KRB5_CLIENT_KTNAME (a keytab to get the ticket from), PATH (the real compiler),
XDG_CACHE_HOME (~/.cache: host back-off, compiler identities); the remote compiler gets
LC_ALL, LC_MESSAGES or LANG, TZ and SOURCE_DATE_EPOCH.
"""


def fnv1a(data: bytes) -> str:
    """A stable short hash (hashlib would cost an import): names the agent of one Kerberos environment."""
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


def kerberos_environment() -> bytes:
    """What decides whose tickets the agent uses: one agent per distinct value (terminals may differ)."""
    return b"\n".join(k + b"=" + v for k, v in sorted(ENVIRON.items()) if k.startswith(b"KRB5"))


def agent_directory() -> bytes:
    chosen = ENVIRON.get(b"SECURECC_AGENT_DIR")
    if chosen:
        return chosen
    runtime = ENVIRON.get(b"XDG_RUNTIME_DIR")
    return runtime + b"/securecc" if runtime else b"/tmp/securecc-%d" % posix.getuid()


def private_directory(path: bytes) -> str | None:
    """Why ``path`` cannot hold our agent's socket, or None: it must be ours alone (another user's
    "agent" there would be handed our jobs and could tell us what to run)."""
    name = path.decode(errors="replace")
    try:
        posix.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        return f"cannot create {name}: {e.strerror}"
    st = posix.lstat(path)
    if (st.st_mode & 0o170000) != 0o040000 or st.st_uid != posix.getuid() or st.st_mode & 0o077:
        return f"{name} is not a private directory of yours (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:o})"
    return None


def connect(path: bytes) -> "_socket.socket":
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        peer = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # struct ucred: pid, uid, gid
        if int.from_bytes(peer[4:8], sys.byteorder) != posix.getuid():
            raise OSError("the agent socket belongs to another user")
        return sock
    except OSError:
        sock.close()
        raise


def start_agent(directory: bytes, name: bytes) -> None:
    """Start the agent (it daemonizes; the first to lock its name wins, the others exit at once)."""
    log = directory + b"/" + name + b".log"
    python = sys.executable.encode()
    pid = posix.posix_spawn(python, [python, b"-I", b"-m", b"securecc.client.agent", directory, name], ENVIRON,
                            file_actions=[(posix.POSIX_SPAWN_OPEN, 0, b"/dev/null", posix.O_RDONLY, 0),
                                          (posix.POSIX_SPAWN_OPEN, 1, log, posix.O_WRONLY | posix.O_CREAT | posix.O_APPEND, 0o600),
                                          (posix.POSIX_SPAWN_DUP2, 1, 2)])
    posix.waitpid(pid, 0)  # it forks and its first process exits once the agent listens


def agent_connection(environment: bytes, start: bool = True) -> "_socket.socket | None":
    """A connection to our agent, started if need be and ``start``; None: direct mode (or no agent)."""
    directory = agent_directory()
    why = private_directory(directory)
    if why:
        write_all(2, f"securecc: {why}; not using the agent (fix it or set SECURECC_AGENT_DIR)\n".encode())
        return None
    name = b"agent-" + fnv1a(AGENT_PROTOCOL + b"\0" + environment).encode()
    path = directory + b"/" + name + b".sock"
    try:
        return connect(path)
    except OSError:
        if not start:
            write_all(2, NO_AGENT)
            return None
    try:
        start_agent(directory, name)
        return wait_for_agent(directory + b"/" + name, path)
    except OSError:
        return None  # the agent cannot start here (its log says why): direct mode


def wait_for_agent(base: bytes, path: bytes) -> "_socket.socket | None":
    import fcntl
    import time

    lock = posix.open(base + b".lock", posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + START_WAIT  # another shim's agent may have won the start and still be starting
    try:
        while True:
            try:
                return connect(path)
            except OSError:
                pass
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None  # nobody holds the agent's lock: it could not start (its log says why)
            except OSError:
                pass  # an agent is starting or running
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
    finally:
        posix.close(lock)


def receive(sock: "_socket.socket") -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[posix.write(fd, view) :]


def through_agent() -> int | None:
    """The job done by the agent: its exit status (or no return: exec'd the local compiler); None if it
    could not be asked or failed before answering, and direct mode should do the job."""
    environment = kerberos_environment()
    sock = agent_connection(environment)
    return None if sock is None else exchange(sock, environment)


def exchange(sock: "_socket.socket", environment: bytes) -> int | None:
    """Send this run to the agent on ``sock`` and carry out its answer (see through_agent)."""
    mask = posix.umask(0o022)
    posix.umask(mask)
    encoding = sys.getfilesystemencoding()
    fields = [AGENT_PROTOCOL, environment, posix.getcwd().encode(encoding, "surrogateescape"),
              b"%o" % mask, b"1" if posix.isatty(2) else b"0", b"%d" % len(sys.argv),
              *(a.encode(encoding, "surrogateescape") for a in sys.argv),
              *(k + b"=" + v for k, v in ENVIRON.items())]
    request = b"\0".join(fields)
    try:
        sock.sendall(b"%d\n" % len(request) + request)
        reply = receive(sock)
    except OSError:
        return None
    finally:
        sock.close()
    head, _, body = reply.partition(b"\n")
    kind, *numbers = head.split(b" ")
    try:
        sizes = [int(n) for n in numbers]
    except ValueError:
        return None
    if kind == b"R" and len(sizes) == 3 and len(body) == sizes[1] + sizes[2]:
        write_all(1, body[: sizes[1]])
        write_all(2, body[sizes[1] :])
        return sizes[0]
    if kind == b"L" and len(sizes) == 1 and 0 <= sizes[0] < len(body):
        write_all(2, body[: sizes[0]])
        path, *argv = body[sizes[0] :].split(b"\0")
        if not argv or not argv[0]:
            return None  # not a command the agent sends
        try:
            posix.execv(path, argv)
        except OSError as e:
            write_all(2, f"securecc: cannot run {path.decode(errors='replace')}: {e.strerror}\n".encode())
            return 127
    return None  # "D" (do it yourself) or a reply cut short: the agent went away


def own_command(command: str) -> int:
    """securecc's own commands: never a compile, never an agent started."""
    if command == "stats":
        environment = kerberos_environment()
        sock = agent_connection(environment, start=False)
        if sock is None:
            return 1  # said why
        status = exchange(sock, environment)
        if status is None:
            write_all(2, b"securecc: the agent did not answer (its log, agent-*.log beside its socket, may say why)\n")
            return 1
        return status
    if command == "--version":
        if sys.flags.no_site:
            import site

            site.main()  # where the package is: 20 ms, without the client's imports or an agent
        from securecc import __version__

        write_all(1, f"securecc {__version__}\n".encode())
        return 0
    write_all(1, HELP)
    return 0


def main() -> None:
    as_compiler = sys.argv[0].rpartition("/")[2] in MASQUERADE_NAMES
    if len(sys.argv) > 1 and sys.argv[1] in OWN_COMMANDS and not as_compiler:
        sys.exit(own_command(sys.argv[1]))
    if len(sys.argv) > 1 and sys.argv[1] == "doctor" and not as_compiler:
        if sys.flags.no_site:
            import site

            site.main()
        from securecc.client.doctor import main as doctor

        doctor(sys.argv[2:])
    # `securecc --show-hosts` and the like are for people, not builds: direct mode
    if len(sys.argv) > 1 and not sys.argv[1].startswith("--") and ENVIRON.get(b"SECURECC_AGENT", b"on") != b"off":
        status = through_agent()
        if status is not None:
            sys.exit(status)
    if sys.flags.no_site:
        import site

        site.main()  # the virtualenv's packages, for direct mode
    from securecc.client.job import main as direct

    direct()
