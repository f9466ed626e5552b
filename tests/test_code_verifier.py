"""The code verifier: code-block extraction, pass/fail against pytest and assert-list tests, and containment of
hostile samples (an infinite loop, a fork bomb, a memory bomb, writes outside the temp directory, reading the
parent's environment, a network socket, signals to the parent): each scores 0 within its time bound, leaves no
process behind, and the parent is unharmed. Each hostile sample is written so that it would PASS its tests if the
attack worked, so a reward of 0 means the sandbox stopped it, and a positive control shows the same check passes
where the action is allowed."""

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

import common
import verifiers

TIMEOUT = 4.0
SLACK = 8.0  # start-up and clean-up of the sandbox's interpreter on a busy 2-core machine


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def call_test(expr: str) -> str:
    return f"from solution import *\n\n\ndef test_it():\n    assert {expr}\n"


@pytest.fixture(scope="module")
def verifier():
    v = verifiers.CodeVerifier(workers=4, timeout_s=TIMEOUT, memory_mb=512, max_procs=8)
    yield v
    v.close()


def uid_processes(uids) -> list[int]:
    """Pids of live (non-zombie) processes owned by any of `uids`."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                st = (p / "status").read_text()
            except OSError:
                continue
            uid = int(next(line for line in st.splitlines() if line.startswith("Uid:")).split()[1])
            state = next(line for line in st.splitlines() if line.startswith("State:")).split()[1]
            if uid in uids and state != "Z":
                out.append(int(p.name))
    return out


def sandbox_uids(v) -> set[int]:
    return {u for u in list(v._slots.queue) if u >= 0}


def strong(v) -> bool:
    return v.isolation["namespaces"]


def run_timed(v, code: str, test: str) -> tuple[float, float]:
    t0 = time.monotonic()
    reward = v([block(code)], [test])[0]
    return reward, time.monotonic() - t0


@pytest.mark.parametrize("text,want", [
    ("```python\nx = 1\n```", "x = 1\n"),
    ("```py\na\n```\ntext\n```python\nb\n```", "b\n"),
    ("```python\nfirst\n```\n```\nbare\n```", "first\n"),   # a tagged block wins over a later untagged one
    ("```\nbare\n```", "bare\n"),
    ("```bash\nls\n```", None),
    ("no code here", None),
    ("```python\nunclosed", None),
])
def test_last_code_block(text, want):
    assert verifiers.last_code_block(text) == want


def test_isolation_report(verifier):
    iso = verifier.isolation
    assert set(iso) == {"namespaces", "uid", "privileges", "network", "filesystem"}
    if iso["namespaces"]:
        assert iso["network"] == "namespace" and iso["filesystem"] == "read-only, tmpfs cwd"
    if os.geteuid() == 0:
        assert iso["uid"] >= verifiers.CodeVerifier.UID_BASE and iso["privileges"] == "own uid"
    elif iso["namespaces"]:
        assert iso["privileges"] == "user namespace, no capabilities"


def test_pass_fail_and_formats(verifier):
    add = block("def add(a, b):\n    return a + b")
    sub = block("def add(a, b):\n    return a - b")
    tests = call_test("add(2, 3) == 5")
    asserts = ["assert add(1, 1) == 2", "assert add(-1, 1) == 0"]
    got = verifier([add, sub, "no code", add, block("def add(a, b) return"), add],
                   [tests, tests, tests, asserts, tests, ["assert add(1, 1) == 3"]])
    assert got == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    # every test must pass, not just one
    two = "from solution import *\n\ndef test_a():\n    assert add(1, 2) == 3\n\ndef test_b():\n    assert add(1, 2) == 4\n"
    assert verifier([add], [two]) == [0.0]


def test_submit_does_not_block(verifier):
    sleepy = block("import time\ndef f():\n    time.sleep(1.5)\n    return 7")
    fut = verifier.submit([sleepy] * 4, [call_test("f() == 7")] * 4)
    assert not fut.done()   # the caller goes on while the samples run
    assert fut.result(timeout=60) == [1.0] * 4


def test_infinite_loop_is_killed_at_the_timeout(verifier):
    killed = verifier.killed
    reward, dt = run_timed(verifier, "def f():\n    while True:\n        pass", call_test("f() is None"))
    assert reward == 0.0 and dt < TIMEOUT + SLACK and verifier.killed == killed + 1
    assert not uid_processes(sandbox_uids(verifier))


def test_fork_bomb_is_contained(verifier):
    code = ("import os\ndef f():\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
            "            pass")
    reward, dt = run_timed(verifier, code, call_test("f()"))
    assert reward == 0.0 and dt < TIMEOUT + SLACK
    time.sleep(0.5)
    assert not uid_processes(sandbox_uids(verifier))
    # a child that leaves the process group (setsid) and sleeps on is killed too, even when the tests pass
    daemon = ("import os, time\ndef f():\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(600)\n"
              "        os._exit(0)\n    return True")
    reward, dt = run_timed(verifier, daemon, call_test("f()"))
    assert reward == (1.0 if strong(verifier) else 0.0) and dt < TIMEOUT + SLACK  # no namespaces: fork is refused
    time.sleep(0.5)
    assert not uid_processes(sandbox_uids(verifier))


def test_memory_bomb_is_contained(verifier):
    reward, dt = run_timed(verifier, "def f():\n    return len(bytearray(4 << 30))", call_test("f() == 4 << 30"))
    assert reward == 0.0 and dt < TIMEOUT + SLACK
    grow = "def f():\n    x = []\n    while True:\n        x.append(bytearray(64 << 20))"
    reward, dt = run_timed(verifier, grow, call_test("f()"))
    assert reward == 0.0 and dt < TIMEOUT + SLACK
    # within the limit, allocation works
    assert run_timed(verifier, "def f():\n    return len(bytearray(64 << 20))", call_test("f() == 64 << 20"))[0] == 1.0


def test_writes_outside_the_temp_dir_are_contained(verifier, tmp_path):
    if not strong(verifier):
        pytest.skip(f"this machine gives the sandbox no read-only file system: {verifier.isolation}")
    tag = uuid.uuid4().hex
    targets = [str(tmp_path / "outside.txt"), f"/tmp/tandem-escape-{tag}", f"/dev/shm/tandem-escape-{tag}",
               str(Path(common.__file__).parent / f"escape-{tag}.txt"), f"/var/tmp/tandem-escape-{tag}"]
    code = ("def f(paths):\n    n = 0\n    for p in paths:\n        try:\n            open(p, 'w').write('x')\n"
            "            n += 1\n        except OSError:\n            pass\n    return n")
    reward, dt = run_timed(verifier, code, call_test(f"f({targets!r}) > 0"))
    assert reward == 0.0 and dt < TIMEOUT + SLACK
    assert not any(os.path.exists(t) for t in targets)
    # the positive control: its own working directory is writable
    assert run_timed(verifier, code, call_test("f(['inside.txt']) == 1"))[0] == 1.0


def test_the_parent_environment_is_not_readable(verifier):
    if not strong(verifier):
        pytest.skip(f"without namespaces, the sandbox may read /proc/<parent>/environ: {verifier.isolation}")
    allowed = {"HOME", "TMPDIR", "LANG", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "MKL_NUM_THREADS", "PYTEST_CURRENT_TEST", "PYTEST_VERSION"}
    # a variable of this process's own environment block (what /proc/<pid>/environ shows), unknown to the sandbox
    mine = [e.decode() for e in Path("/proc/self/environ").read_bytes().split(b"\0") if b"=" in e]
    marker = next(e for e in mine if e.split("=")[0] not in allowed and len(e) > 8)
    code = ("import os\ndef f(parent):\n    seen = ' '.join(f'{k}={v}' for k, v in os.environ.items())\n"
            "    for p in [parent, os.getppid(), 1, 'self']:\n        try:\n"
            "            seen += open(f'/proc/{p}/environ', 'rb').read().decode(errors='replace')\n"
            "        except OSError:\n            pass\n    return seen")
    namespace = {}
    exec(code, namespace)
    assert marker in namespace["f"](os.getpid())   # the positive control: the attack works outside the sandbox
    reward, _ = run_timed(verifier, code, call_test(f"{marker!r} in f({os.getpid()})"))
    assert reward == 0.0
    env_code = "import os\ndef f():\n    return set(os.environ)"
    assert run_timed(verifier, env_code, call_test(f"f() <= {allowed!r}"))[0] == 1.0


def listen() -> tuple[socket.socket, list, threading.Thread]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(TIMEOUT + SLACK)
    hits = []

    def accept():
        try:
            conn, _ = server.accept()
            hits.append(conn.recv(16))
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    return server, hits, t


def test_network_is_contained(verifier):
    code = ("import socket\ndef f(port):\n    s = socket.create_connection(('127.0.0.1', port), timeout=2)\n"
            "    s.sendall(b'leak')\n    return True")
    server, hits, t = listen()
    namespace = {}
    exec(code, namespace)
    namespace["f"](server.getsockname()[1])   # the positive control: outside the sandbox it connects
    t.join()
    server.close()
    assert hits == [b"leak"]
    server, hits, t = listen()
    reward, dt = run_timed(verifier, code, call_test(f"f({server.getsockname()[1]})"))
    server.close()
    t.join()
    assert reward == 0.0 and dt < TIMEOUT + SLACK and hits == []
    dns = "import socket\ndef f():\n    return socket.getaddrinfo('example.com', 80)"
    assert run_timed(verifier, dns, call_test("f()"))[0] == 0.0


def test_signals_cannot_reach_the_parent_and_it_still_works(verifier):
    for attack in ("os.kill(-1, 9)", "os.kill(os.getppid(), 9)", f"os.kill({os.getpid()}, 9)",
                   f"os.killpg({os.getpgrp()}, 9)"):
        code = f"import os\ndef f():\n    try:\n        {attack}\n    except OSError:\n        return False\n    return True"
        run_timed(verifier, code, call_test("f()"))
    assert verifier([block("def g():\n    return 2")], [call_test("g() == 2")]) == [1.0]
    assert verifier.errors == 0
