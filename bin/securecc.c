/* securecc: the per-compile shim in C, in front of the user's securecc agent.
 *
 * Mercurial's chg is the precedent: a compile runs this thousands of times a
 * build, and a Python interpreter costs ~8 ms of CPU per start where this
 * costs well under one.  It does only the common case, a job handed to an
 * agent that is already running, and it speaks exactly the Python shim's
 * protocol (described once, in securecc/client/agent_wire.py): same agent
 * name, same trust checks on the socket directory (ours, a directory, mode
 * 0700) and on the peer (our uid).
 *
 * Everything else runs the Python shim, which stays the reference and the
 * fallback: securecc's own commands, no agent yet (it starts one), a
 * directory that is not private (after saying so here, once), an agent that
 * answers "do it yourself" or dies mid-job (then SECURECC_AGENT=off: direct
 * mode, the job is not handed over twice).
 *
 * scripts/setup builds it with SHIM_PYTHON (the virtualenv's python) and
 * SHIM_DIR (where securecc_shim.py is) defined.
 */
#define _GNU_SOURCE /* struct ucred */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef SHIM_PYTHON
#error "build with -DSHIM_PYTHON='\"/venv/bin/python\"' -DSHIM_DIR='\"/venv/bin\"' (scripts/setup does)"
#endif

#define AGENT_PROTOCOL "securecc-agent 2" /* securecc.client.agent_wire.PROTOCOL */

extern char **environ;

static void *allocated(void *memory) {
    if (!memory) { /* never go on with less: an empty environment would be another Kerberos identity */
        perror("securecc: out of memory");
        exit(1);
    }
    return memory;
}

/* A growable byte buffer: the request and the reply. */
struct buf {
    char *data;
    size_t len, cap;
};

static void put(struct buf *b, const void *data, size_t len) {
    if (b->len + len + 1 > b->cap) {
        b->cap = (b->len + len + 1) * 2;
        b->data = allocated(realloc(b->data, b->cap));
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
}

static void put_str(struct buf *b, const char *s) { put(b, s, strlen(s)); }

static void write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return; /* as Python's shim: a closed stdout is the caller's business */
        data += n, len -= n;
    }
}

/* Run the Python shim with our argv (argv[0] kept: it may be a masquerade name). */
static void python_shim(int argc, char **argv) {
    static const char code[] =
        "import sys;sys.path.insert(0,sys.argv.pop(1));del sys.argv[0];from securecc_shim import main;main()";
    char **args = allocated(calloc(argc + 7, sizeof *args)); /* the 6 below, argv, NULL */
    args[0] = SHIM_PYTHON, args[1] = "-I", args[2] = "-S", args[3] = "-c", args[4] = (char *)code;
    args[5] = SHIM_DIR;
    memcpy(args + 6, argv, argc * sizeof *argv);
    execv(SHIM_PYTHON, args);
    fprintf(stderr, "securecc: cannot run %s: %s (run scripts/setup again)\n", SHIM_PYTHON, strerror(errno));
    exit(127);
}

static void direct_mode(int argc, char **argv) {
    setenv("SECURECC_AGENT", "off", 1);
    python_shim(argc, argv);
}

/* environ as Python's posix.environ has it: entries with '=', the first of each name. */
static size_t environment(char ***out) {
    size_t n = 0, kept = 0;
    while (environ[n])
        n++;
    char **entries = allocated(calloc(n + 1, sizeof *entries));
    for (size_t i = 0; i < n; i++) {
        const char *eq = strchr(environ[i], '=');
        if (!eq)
            continue;
        size_t key = eq - environ[i] + 1;
        size_t j = 0;
        while (j < kept && strncmp(entries[j], environ[i], key) != 0)
            j++;
        if (j == kept)
            entries[kept++] = environ[i];
    }
    *out = entries;
    return kept;
}

/* Order of names (not of whole entries: "A-B=" sorts before "A=" as a string, after it as a name). */
static int by_name(const void *a, const void *b) {
    const unsigned char *x = *(const unsigned char *const *)a, *y = *(const unsigned char *const *)b;
    for (;; x++, y++) {
        int cx = *x == '=' ? -1 : *x, cy = *y == '=' ? -1 : *y;
        if (cx != cy || cx == -1)
            return cx - cy;
    }
}

/* The KRB5* entries, sorted by name, joined by newlines: whose tickets the agent uses. */
static void kerberos_environment(struct buf *b, char **entries, size_t n) {
    char **krb = allocated(calloc(n + 1, sizeof *krb));
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(entries[i], "KRB5", 4) == 0)
            krb[k++] = entries[i];
    qsort(krb, k, sizeof *krb, by_name);
    for (size_t i = 0; i < k; i++) {
        if (i)
            put(b, "\n", 1);
        put_str(b, krb[i]);
    }
    free(krb);
}

static uint64_t fnv1a(const char *data, size_t len) {
    uint64_t value = 0xCBF29CE484222325ULL;
    for (size_t i = 0; i < len; i++)
        value = (value ^ (unsigned char)data[i]) * 0x100000001B3ULL;
    return value;
}

/* Why directory cannot hold our agent's socket, written to stderr; 0 if it is ours alone. */
static int not_private(const char *directory) {
    struct stat st = {0};
    if (mkdir(directory, 0700) != 0 && errno != EEXIST) {
        fprintf(stderr, "securecc: cannot create %s: %s; not using the agent (fix it or set SECURECC_AGENT_DIR)\n",
                directory, strerror(errno));
        return 1;
    }
    if (lstat(directory, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid() || (st.st_mode & 077)) {
        fprintf(stderr,
                "securecc: %s is not a private directory of yours (owner uid %u, mode %o); "
                "not using the agent (fix it or set SECURECC_AGENT_DIR)\n",
                directory, (unsigned)st.st_uid, (unsigned)(st.st_mode & 07777));
        return 1;
    }
    return 0;
}

/* A connection to the agent's socket if it listens and runs as our uid; -1 otherwise. */
static int connect_agent(const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct ucred peer;
    socklen_t size = sizeof peer;
    if (strlen(path) >= sizeof addr.sun_path)
        return -1;
    strcpy(addr.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -1;
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &peer, &size) != 0 || peer.uid != getuid()) {
        close(sock);
        return -1;
    }
    return sock;
}

/* The reply's header numbers; how many were read, or -1 if the header is not "KIND n n...\n" with single
 * spaces and decimal numbers, sizes not negative (the first number of an "R" header, the status, may be). */
static int header(const char *reply, size_t len, long long *numbers, int max, const char **body) {
    const char *end = memchr(reply, '\n', len), *p = reply + 1;
    int count = 0;
    if (!end)
        return -1;
    while (p < end && count < max) {
        char *stop;
        int signed_ok = count == 0 && *reply == 'R';
        if (*p++ != ' ' || !(('0' <= *p && *p <= '9') || (signed_ok && *p == '-')))
            return -1;
        errno = 0;
        numbers[count++] = strtoll(p, &stop, 10);
        if (stop == p || errno || (!signed_ok && numbers[count - 1] < 0))
            return -1;
        p = stop;
    }
    *body = end + 1;
    return p == end ? count : -1;
}

int main(int argc, char **argv) {
    /* The name we were run by, as the kernel took it (a script shim's sys.argv[0]): the client recognises
     * itself on PATH by it, so a symlink named gcc run with a bare argv[0] does not run itself again. */
    const char *run_as = (const char *)getauxval(AT_EXECFN);
    static char *no_arguments[2];
    if (argc == 0) /* execve with an empty argv: as if run by name alone */
        argv = no_arguments, argc = 1, argv[0] = "securecc";
    if (run_as && *run_as)
        argv[0] = (char *)run_as;
    const char *command = argc > 1 ? argv[1] : "";
    const char *name = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    static const char *const masquerade[] = {"gcc", "cc", "g++", "c++", "clang", "clang++"};
    int as_compiler = 0;
    for (size_t i = 0; i < sizeof masquerade / sizeof *masquerade; i++)
        as_compiler |= strcmp(name, masquerade[i]) == 0;
    const char *agent = getenv("SECURECC_AGENT");
    if (argc < 2 || strncmp(command, "--", 2) == 0 || (agent && strcmp(agent, "off") == 0) ||
        (!as_compiler && (strcmp(command, "stats") == 0 || strcmp(command, "-h") == 0 || strcmp(command, "doctor") == 0)))
        python_shim(argc, argv); /* own commands, options for people, direct mode: the Python shim's */

    char **env;
    size_t nenv = environment(&env);
    struct buf directory = {0}, path = {0}, request = {0}, reply = {0};
    const char *chosen = getenv("SECURECC_AGENT_DIR"), *runtime = getenv("XDG_RUNTIME_DIR");
    char number[64];
    if (chosen && *chosen)
        put_str(&directory, chosen);
    else if (runtime && *runtime)
        put_str(&directory, runtime), put_str(&directory, "/securecc");
    else
        snprintf(number, sizeof number, "/tmp/securecc-%u", (unsigned)getuid()), put_str(&directory, number);
    if (not_private(directory.data))
        direct_mode(argc, argv);

    put_str(&request, AGENT_PROTOCOL), put(&request, "", 1);
    kerberos_environment(&request, env, nenv);
    snprintf(number, sizeof number, "/agent-%016llx.sock",
             (unsigned long long)fnv1a(request.data, request.len)); /* of "PROTOCOL\0KRB5ENV" */
    put_str(&path, directory.data), put_str(&path, number);
    int sock = connect_agent(path.data);
    if (sock < 0)
        python_shim(argc, argv); /* it starts the agent */

    char cwd[4096];
    mode_t mask = umask(022);
    umask(mask);
    if (!getcwd(cwd, sizeof cwd))
        python_shim(argc, argv);
    snprintf(number, sizeof number, "%o", (unsigned)mask);
    const char *fields[] = {cwd, number, isatty(2) ? "1" : "0"};
    for (size_t i = 0; i < 3; i++)
        put(&request, "", 1), put_str(&request, fields[i]);
    snprintf(number, sizeof number, "%d", argc);
    put(&request, "", 1), put_str(&request, number);
    for (int i = 0; i < argc; i++)
        put(&request, "", 1), put_str(&request, argv[i]);
    for (size_t i = 0; i < nenv; i++)
        put(&request, "", 1), put_str(&request, env[i]);

    int framed = snprintf(number, sizeof number, "%zu\n", request.len);
    struct buf message = {0};
    put(&message, number, framed), put(&message, request.data, request.len);
    for (size_t sent = 0; sent < message.len;) {
        ssize_t n = send(sock, message.data + sent, message.len - sent, MSG_NOSIGNAL);
        if (n < 0 && errno != EINTR)
            direct_mode(argc, argv);
        sent += n > 0 ? n : 0;
    }
    for (;;) {
        char chunk[65536];
        ssize_t n = recv(sock, chunk, sizeof chunk, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            direct_mode(argc, argv);
        if (n == 0)
            break;
        put(&reply, chunk, n);
    }
    close(sock);

    long long sizes[3];
    const char *body;
    size_t got = reply.len;
    if (got && reply.data[0] == 'R' && header(reply.data, got, sizes, 3, &body) == 3) {
        unsigned long long left = reply.data + got - body, out = sizes[1], err = sizes[2];
        if (out <= left && err == left - out) {
            write_all(1, body, out);
            write_all(2, body + out, err);
            return (int)(sizes[0] & 0xff); /* as exit(3) keeps it, and Python's sys.exit */
        }
    }
    if (got && reply.data[0] == 'L' && header(reply.data, got, sizes, 1, &body) == 1 &&
        (unsigned long long)(reply.data + got - body) > (unsigned long long)sizes[0]) {
        const char *program = body + sizes[0], *end = reply.data + got;
        size_t count = 0;
        for (const char *p = program; p < end; p++)
            count += *p == '\0';
        char **args = allocated(calloc(count + 1, sizeof *args)); /* after the path: count fields */
        size_t k = 0;
        for (const char *p = program + strlen(program) + 1; p <= end && k < count; p += strlen(p) + 1)
            args[k++] = (char *)p;
        if (count > 0 && *args[0]) { /* else not a command the agent sends: direct mode, below */
            write_all(2, body, sizes[0]);
            execv(program, args);
            fprintf(stderr, "securecc: cannot run %s: %s\n", program, strerror(errno));
            return 127;
        }
    }
    direct_mode(argc, argv); /* "D" (do it yourself), or a reply cut short: the agent went away */
}
