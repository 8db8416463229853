"""Run model-generated code and judge it without trusting anything it says (HumanEval, MBPP).

Threat model. A completion is arbitrary Python. It may try to forge its verdict (print a token,
exit 0, patch `assert`, return an object whose == is always True), to read, write, delete or signal
the user's files and processes, to use the network, or to exhaust the machine (loops, memory, fork
bombs, endless output). This module stays stdlib-only so that any python3 can run it.

The verdict. Two processes, never one: the JAIL runs only the completion and answers calls; the
JUDGE, a separate unconfined process that runs only trusted code (the benchmark's prompt helpers
and tests), binds each tested function name to a stub that sends the arguments to the jail and gets
the return value back as plain data (None, bool, int, float, str, bytes and lists, tuples, sets,
dicts of them), rebuilt by the judge. So no object, output, exit code or file of the completion's
making decides the outcome: only the judge's assertions on those values do. Its verdict goes to the
caller with a fresh nonce, on a pipe the jail cannot reach.

The jail. A user namespace (unprivileged, via util-linux `unshare`) with its own mount, PID and
network namespaces: a fresh root on a 16 MiB tmpfs holding read-only binds of /usr and of the
interpreter's prefix with every site-packages/dist-packages directory hidden (the standard library
only: no third-party module, and no benchmark data to look answers up in), /dev/null and /proc of
its own (pivot_root; the old root is detached), no
capabilities, no_new_privs; started as `nobody` when the caller is root. It sees none of the user's
files, cannot signal any process outside (they have no PID in its namespace), has only a down
loopback interface, and everything it writes vanishes with the tmpfs. Limits: wall clock (the
caller kills the judge's process group, and the jail dies with it), CPU seconds, address space,
file size (its stdout/stderr go to an 8 MiB file in the tmpfs: past that it is killed), no new
processes or threads (RLIMIT_NPROC 0). Without user namespaces (old kernels, some containers) code is
refused unless the caller accepts the risk (eval.py --allow-unsandboxed-code): the completion then
runs with the same limits, as `nobody` when root, but with the user's filesystem and network.

Not contained: kernel exploits; reading world-readable system files under /usr; CPU contention.
"""
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CODEC = r'''
import json
LIMIT = 1_000_000

def enc(v, depth=0, count=[0]):
    """Plain data as JSON: ["N"] None, ["B", b] bool, ["i", str] int, ["f", repr] float, ["s", str],
    ["y", hex] bytes, ["l"|"t"|"S"|"F", items] list/tuple/set/frozenset, ["d", [[k, v], ...]] dict."""
    count[0] += 1
    if depth > 100 or count[0] > LIMIT:
        raise ValueError("value too large to cross the sandbox")
    t = type(v)
    if v is None: return ["N"]
    if t is bool: return ["B", v]
    if t is int: return ["i", str(v)]
    if t is float: return ["f", repr(v)]
    if t is str: return ["s", v]
    if t is bytes: return ["y", v.hex()]
    tags = {list: "l", tuple: "t", set: "S", frozenset: "F"}
    if t in tags: return [tags[t], [enc(x, depth + 1) for x in v]]
    if t is dict: return ["d", [[enc(k, depth + 1), enc(x, depth + 1)] for k, x in v.items()]]
    raise TypeError(f"a {t.__name__} cannot cross the sandbox (only plain data can)")

def dec(m):
    tag = m[0]
    if tag == "N": return None
    if tag == "B": return bool(m[1])
    if tag == "i": return int(m[1])
    if tag == "f": return float(m[1])
    if tag == "s": return str(m[1])
    if tag == "y": return bytes.fromhex(m[1])
    if tag in "ltSF": return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](dec(x) for x in m[1])
    if tag == "d": return {dec(k): dec(x) for k, x in m[1]}
    raise ValueError(f"unknown tag {tag!r}")
'''

# Inside the jail: run the completion, then answer ["call", id, name, args, kwargs] lines on the pipes.
CHILD = CODEC + r'''
import os, resource, sys
seconds, memory = int(sys.argv[1]), int(sys.argv[2])
rpc_in, rpc_out = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
out = os.open(".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(out, 1)
os.dup2(out, 2)
for lim, value in ((resource.RLIMIT_CPU, seconds), (resource.RLIMIT_AS, memory),
                   (resource.RLIMIT_FSIZE, 8 << 20), (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_NOFILE, 64)):
    resource.setrlimit(lim, (value, value))
source = json.loads(rpc_in.readline())
ns = {"__name__": "solution"}
def say(msg):
    rpc_out.write(json.dumps(msg) + "\n")
    rpc_out.flush()
try:
    exec(compile(source, "solution.py", "exec"), ns)
    say(["ready"])
except BaseException as e:
    say(["error", type(e).__name__])
    raise SystemExit(1)
for line in rpc_in:
    _, cid, name, args, kwargs = json.loads(line)
    try:
        say(["ok", cid, enc(ns[name](*dec(args), **dec(kwargs)), 0, [0])])
    except BaseException as e:
        say(["raise", cid, type(e).__name__, str(e)[:1000]])
'''

# Outside, trusted: start the jail, bind the tested names to calls into it, run the tests.
JUDGE = CODEC + r'''
import builtins, json, os, secrets, subprocess, sys
job = json.loads(sys.stdin.read())
verdict = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)                 # what the tests print cannot reach the verdict
jail = subprocess.Popen(job["jail"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

def send(msg):
    jail.stdin.write((json.dumps(msg) + "\n").encode())
    jail.stdin.flush()

def receive():
    line = jail.stdout.readline(1 << 24)
    if not line.endswith(b"\n"):
        raise RuntimeError("the sandboxed program died or sent too much")
    return json.loads(line)

class Remote:
    def __init__(self, name):
        self.name = name
    def __call__(self, *args, **kwargs):
        cid = secrets.token_hex(8)                # a frame written unasked cannot answer this call
        send(["call", cid, self.name, enc(list(args), 0, [0]), enc(kwargs, 0, [0])])
        reply = receive()
        if reply[1:2] != [cid]:
            raise RuntimeError("the sandboxed program broke the protocol")
        if reply[0] == "ok":
            return dec(reply[2])
        kind = getattr(builtins, str(reply[2]), None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RuntimeError
        raise kind(str(reply[3]))

send(job["program"])
if receive() != ["ready"]:
    raise SystemExit(1)
g = {"__name__": "judge"}
exec(job["setup"], g)
for name in job["names"]:
    g[name] = Remote(name)
exec(job["tests"], g)
verdict.write("PASS " + job["nonce"] + "\n")
verdict.flush()
os._exit(0)
'''

# The jail's setup, run by sh as root of a fresh user namespace; $1 = interpreter, $2.. = ro binds.
JAIL_SH = r'''
set -e
py=$1; shift
mount -t tmpfs -o size=16m,mode=755 jail /tmp
cd /tmp
mkdir -p proc dev work .old
for p in /usr "$@"; do
  mkdir -p ".$p" && mount --rbind "$p" ".$p" && mount -o remount,bind,ro,nosuid,nodev ".$p"
  for d in $(find ".$p" -maxdepth 5 -type d \( -name site-packages -o -name dist-packages \) -prune); do
    mount -t tmpfs -o size=4k,ro hidden "$d"           # third-party packages (and benchmark data) are hidden
  done
done
for l in bin lib lib64 sbin; do
  if [ -L "/$l" ]; then ln -s "$(readlink "/$l")" "$l"; elif [ -d "/$l" ] && [ ! -e "$l" ]; then
    mkdir "$l" && mount --rbind "/$l" "$l" && mount -o remount,bind,ro,nosuid,nodev "$l"; fi
done
touch dev/null && mount --bind /dev/null dev/null
mount -t proc proc proc
pivot_root . .old
cd /
umount -l /.old
rmdir /.old
cd /work
exec setpriv --no-new-privs --bounding-set=-all --inh-caps=-all \
    "$py" -I -S -c "$CHILD" "$SECONDS_LIMIT" "$MEMORY_LIMIT"
'''


class SandboxUnavailable(RuntimeError):
    pass


def _interpreter():
    """This Python, or (as root, where the jail runs as nobody) a python3 that nobody may execute."""
    if os.getuid() != 0:
        return sys.executable
    for exe in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        p = Path(exe).resolve()
        if p.exists() and all(os.stat(d).st_mode & 0o001 for d in [p, *p.parents]):
            return str(p)
    raise SandboxUnavailable("running as root, and no python3 is executable by user nobody for the sandbox")


def _jail_command(seconds, memory_mb):
    """argv that starts CHILD in the jail (see the module docstring)."""
    py = _interpreter()
    prefix = Path(py).resolve().parents[1]
    binds = [] if str(prefix).startswith("/usr") or prefix == Path("/") else [str(prefix)]
    if py == sys.executable and not sys.base_prefix.startswith("/usr"):
        binds += [p for p in {sys.base_prefix, sys.prefix} if p not in binds]
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.getuid() == 0 else []
    env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"CHILD={CHILD}", f"SECONDS_LIMIT={seconds}",
           f"MEMORY_LIMIT={memory_mb << 20}"]
    return [*drop, *env, "unshare", "--map-root-user", "--mount", "--pid", "--net", "--fork", "--kill-child",
            "sh", "-c", JAIL_SH, "jail", py, *binds]


def _plain_command(seconds, memory_mb):
    """The same child without namespaces (only with allow_unsandboxed): limits, nobody when root."""
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.getuid() == 0 else []
    return [*drop, _interpreter(), "-I", "-c", CHILD, str(seconds), str(memory_mb << 20)]


_AVAILABLE = {}


def why_unavailable():
    """None when the jail works on this machine (checked once by running one), else the reason."""
    if "reason" not in _AVAILABLE:
        reason = None
        if not shutil.which("unshare") or not shutil.which("setpriv"):
            reason = "util-linux unshare/setpriv not found"
        else:
            try:
                ok = _judge("def f():\n    return 1\n", "assert f() == 1\n", ["f"], "",
                            20, 256, _jail_command)
                reason = None if ok else "user namespaces are not available to this user (unshare failed)"
            except (OSError, SandboxUnavailable) as e:
                reason = str(e)
        _AVAILABLE["reason"] = reason
    return _AVAILABLE["reason"]


def _judge(program, tests, names, setup, timeout, memory_mb, command):
    nonce = secrets.token_hex(16)
    job = {"program": program, "tests": tests, "names": list(names), "setup": setup, "nonce": nonce,
           "jail": command(timeout + 1, memory_mb)}
    work = tempfile.mkdtemp(prefix="nara-judge-")   # the unsandboxed child's working directory
    os.chmod(work, 0o777 if os.getuid() == 0 else 0o700)
    judge = subprocess.Popen([sys.executable, "-I", "-c", JUDGE], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, start_new_session=True, cwd=work)
    try:
        out, _ = judge.communicate(json.dumps(job).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        try:
            os.killpg(judge.pid, 9)                  # the judge, unshare, and with it the whole jail
        except ProcessLookupError:
            pass
        judge.communicate()
        shutil.rmtree(work, ignore_errors=True)
    return out.strip() == f"PASS {nonce}".encode()


def run_untrusted(program, tests, names, setup="", timeout=10, memory_mb=1024, allow_unsandboxed=False):
    """True only if the trusted `tests` (run after the trusted `setup`) pass when every function in
    `names` is the one the untrusted `program` defines, called inside the jail with plain-data
    arguments and results. Raises SandboxUnavailable when no jail can be made, unless
    allow_unsandboxed (then only resource limits and a dropped uid contain the program)."""
    reason = why_unavailable()
    if reason and not allow_unsandboxed:
        raise SandboxUnavailable(f"cannot contain generated code here ({reason}): pass --allow-unsandboxed-"
                                 "code to run it with resource limits only, at your own risk")
    return _judge(program, tests, names, setup, timeout, memory_mb,
                  _plain_command if reason else _jail_command)
