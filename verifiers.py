"""The verifiers: the final answer of a math response (the last \\boxed{} or an <answer> tag) graded by math-verify
in worker processes with timeouts, the per-tag format reward, and model-written code run against its tests in a
sandboxed subprocess (namespaces, time, memory and process limits). Paper-agnostic, like `common.py`.
"""

import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------
# 1. Verifier: the final answer (last \boxed{} or <answer> tag), graded by math-verify in worker processes
# ----------------------------------------------------------------------------------------------------------
MAX_ANSWER_CHARS = 400  # a longer "final answer" is model babble; grading it would only risk sympy blow-ups


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces; None if absent or unclosed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        rest = text[start + len("\\boxed"):].lstrip()  # "\boxed 5": the form without braces
        m = re.match(r"([^\s$]+)", rest) if text.startswith("\\boxed", start) else None
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text: str, mode: str = "boxed") -> str | None:
    """The final answer of a completion. `boxed`: the last \\boxed{}; `answer_tag`: the last <answer>...</answer>
    (a \\boxed{} inside it wins), the form asked for by R1-Zero-style templates; `code`: the last Python block."""
    if mode == "code":
        return last_code_block(text)
    if mode == "answer_tag":
        tags = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
        if not tags:
            return None
        inner = last_boxed(tags[-1])
        return inner if inner is not None else tags[-1].strip()
    if mode != "boxed":
        raise ValueError(f"unknown answer mode {mode!r}; use 'boxed', 'answer_tag' or 'code'")
    return last_boxed(text)


def normalize_answer(s: str) -> str:
    """Only meaning-preserving rewrites: spacing, \\left/\\right, \\dfrac, surrounding $ and a final period."""
    s = re.sub(r"\\left|\\right|\\[,;:!]|\s+", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.strip("$").rstrip(".")


def tag_format_reward(text: str, tags: tuple[str, ...], per_tag: float) -> float:
    """`per_tag` for each tag that occurs exactly once (e.g. R1-Zero's </think> and </answer>)."""
    return per_tag * sum(text.count(t) == 1 for t in tags)


# The worker runs math-verify in its own main thread, where math-verify's signal-based timeouts work; the parent
# bounds each answer by wall-clock time and kills a worker stuck in C code (e.g. sympy evaluating 9^9^9^9).
# It is a `python -c` program so that it starts in ~0.5 s without importing torch or the calling script.
_WORKER = r"""
import json, sys
from math_verify import parse, verify
for line in sys.stdin:
    pred, gold, t = json.loads(line)
    try:
        g = parse("\\boxed{" + gold + "}", parsing_timeout=t)
        p = parse("\\boxed{" + pred + "}", parsing_timeout=t)
        ok = bool(g) and bool(p) and verify(g, p, timeout_seconds=t)
    except BaseException:
        ok = False
    sys.stdout.write("1\n" if ok else "0\n"); sys.stdout.flush()
"""


class Grader:
    """Accuracy reward in {0, 1}: the completion's final answer against the gold answer.

    Equal normalized strings score 1 at once; everything else goes to math-verify in `workers` subprocesses
    with at most `timeout_s` per answer, after which the worker is killed and replaced and the answer scores 0.
    Safe to call from any thread; never raises on model output; results are cached per (answer, gold)."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, mode: str = "boxed"):
        self.n, self.timeout_s, self.mode = workers, timeout_s, mode
        self._procs: list[subprocess.Popen | None] = [None] * workers
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], float] = {}
        self.killed = 0  # answers that hit the time limit (a metric worth watching)
        self.lost = 0    # answers whose worker died under them (killed from outside, out of memory): scored 0
        self._reported = 0

    def _proc(self, w: int) -> subprocess.Popen:
        if self._procs[w] is None or self._procs[w].poll() is not None:
            env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sys.path)}
            self._procs[w] = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        return self._procs[w]

    def _kill(self, w: int) -> None:
        if self._procs[w] is not None:
            self._procs[w].kill()
            self._procs[w].wait()
            self._procs[w] = None

    def close(self) -> None:
        for w in range(self.n):
            self._kill(w)

    def take_failures(self) -> int:
        """Answers scored 0 because grading failed (time limit or a dead worker) since the last call: a step's
        `reward/grader_failures`. The run goes on; a dead worker is replaced for the next answer."""
        total = self.killed + self.lost
        new, self._reported = total - self._reported, total
        return new

    def __call__(self, completions: list[str], golds: list[str]) -> list[float]:
        preds = [extract_answer(c, self.mode) for c in completions]
        scores: list[float | None] = [None] * len(preds)
        todo = []
        for i, (p, g) in enumerate(zip(preds, golds)):
            if p is None or not p.strip() or len(p) > MAX_ANSWER_CHARS:
                scores[i] = 0.0
            elif normalize_answer(p) == normalize_answer(g):
                scores[i] = 1.0
            elif (p, g) in self._cache:
                scores[i] = self._cache[(p, g)]
            else:
                todo.append(i)
        with self._lock:
            self._run(todo, preds, golds, scores)
        return [float(s) for s in scores]

    def _run(self, todo: list[int], preds, golds, scores) -> None:
        todo, busy = list(reversed(todo)), {}  # busy: worker -> (answer index, deadline)
        t_int = max(1, int(self.timeout_s))
        while todo or busy:
            for w in range(self.n):
                if w not in busy and todo:
                    i = todo.pop()
                    try:
                        proc = self._proc(w)
                        proc.stdin.write(json.dumps([preds[i], golds[i], t_int]) + "\n")
                        proc.stdin.flush()
                        busy[w] = (i, time.monotonic() + self.timeout_s)
                    except OSError:  # the worker died under us: treat the answer as unverifiable
                        self._kill(w)
                        self.lost += 1
                        scores[i] = 0.0
            if not busy:
                continue
            wait = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
            ready, _, _ = select.select([self._procs[w].stdout for w in busy], [], [], wait)
            for w in list(busy):
                i, deadline = busy[w]
                if self._procs[w].stdout in ready:
                    line = self._procs[w].stdout.readline()
                    scores[i] = 1.0 if line.strip() == "1" else 0.0
                    if line:
                        self._cache[(preds[i], golds[i])] = scores[i]
                    else:  # the worker died mid-answer: the answer scores 0, uncached, and a new worker takes over
                        self._kill(w)
                        self.lost += 1
                    del busy[w]
                elif time.monotonic() >= deadline:
                    self._kill(w)
                    self.killed += 1
                    scores[i] = 0.0
                    del busy[w]


def grade_each(verify: dict, kinds: list[str], completions: list[str], golds: list) -> list[float]:
    """Rewards of a batch whose rows need different verifiers: row i graded by `verify[kinds[i]]`, one call per kind."""
    out = [0.0] * len(completions)
    for kind in set(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        for i, r in zip(idx, verify[kind]([completions[i] for i in idx], [golds[i] for i in idx])):
            out[i] = r
    return out


# ----------------------------------------------------------------------------------------------------------
# 2. Code verifier: the completion's last Python block against the problem's tests, in a sandboxed subprocess
# ----------------------------------------------------------------------------------------------------------
def last_code_block(text: str) -> str | None:
    """The last fenced block tagged python/py/python3, else the last untagged fenced block, else None."""
    blocks = re.findall(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", text, flags=re.S)
    tagged = [body for tag, body in blocks if tag.lower() in ("python", "py", "python3")]
    untagged = [body for tag, body in blocks if not tag]
    return (tagged or untagged or [None])[-1]


def tests_source(tests) -> str:
    """A pytest file from the dataset's tests: a pytest file as is (KodCode), or a list of assert statements
    (AceCode) wrapped into one test function."""
    if isinstance(tests, str):
        return tests
    body = "\n".join("    " + line for t in tests for line in str(t).splitlines()) or "    pass"
    return f"from solution import *\n\n\ndef test_asserts():\n{body}\n"


# The sandbox is `python -I -B -c _SANDBOX` with a fixed environment, in a session of its own; it reads its job from
# stdin and reports on a pipe of its own (fd `report_fd`) that the tested code never holds, so no printed line can
# fake a pass. It forks: the parent stays trusted, as the timer and reaper; the child sets up and runs the tests.
# On Linux the child is pid 1 of fresh pid, mount and network namespaces (made as root, or inside a user namespace
# when not root): killing it at the timeout kills everything it started and nothing outside is visible to it; it
# has no network (a new namespace has only a loopback device, down); it sees the file system read-only, except a
# size-capped tmpfs as its working directory, with directories closed to other users (say /root) covered, apart
# from Python itself. As root it then runs as an unprivileged uid of its own, so that the process limit (which root
# ignores) and file permissions bite and no other process's /proc/<pid>/environ is readable; in a user namespace
# it drops every capability. Without namespaces (refused, e.g. by a container's seccomp profile) it keeps the
# limits, the empty environment and, as root, its own uid, and an audit hook refuses sockets, ctypes, fork, exec
# and signals: a barrier against Python code, not native code. `CodeVerifier.isolation` says which applies.
_SANDBOX = r"""
import ctypes, json, os, resource, signal, sys
job = json.loads(sys.stdin.read())
fd = os.open(os.devnull, os.O_RDONLY); os.dup2(fd, 0); os.close(fd)
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
box, uid, report, root = job["dir"], job["uid"], job["report_fd"], os.geteuid() == 0
outside_uid, outside_gid = os.geteuid(), os.getegid()
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
KEEP = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
NEWNS, NEWUSER, NEWPID, NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000

def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: s.encode() if isinstance(s, str) else s
    if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
        raise OSError(ctypes.get_errno(), "mount " + dst)

def expose(paths):
    # A directory others may not enter (say /root or /home/me) is covered with an empty tmpfs, and only the Python
    # directories inside it are bound back, read-only: Python stays importable, the rest of it is out of sight.
    hidden = {}
    for p in paths:
        parts = p.split("/")
        anc = next((a for a in ("/".join(parts[:i]) for i in range(2, len(parts))) if not os.stat(a).st_mode & 1), None)
        if anc:
            hidden.setdefault(anc, []).append(p)
    for anc, inside in hidden.items():
        fds = {p: os.open(p, os.O_PATH) for p in inside if not any(p.startswith(q + "/") for q in inside)}
        mount("tmpfs", anc, "tmpfs", NOSUID | NODEV, "mode=0755")
        for p, fd in fds.items():
            os.makedirs(p, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", p, None, BIND | REC)
            mount(None, p, None, REMOUNT | BIND | RDONLY)
        mount(None, anc, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)

def sandbox(ns):
    iso = {"namespaces": bool(ns), "uid": outside_uid, "privileges": "unchanged", "network": "audit hook",
           "filesystem": "permissions"}
    if ns:
        mount(None, "/", None, REC | PRIVATE)  # nothing below propagates back to the host
        writable = []
        for line in open("/proc/self/mountinfo").read().splitlines():
            f = line.split()
            point = f[4].encode().decode("unicode_escape")
            try:  # a bind remount changes this mount only, in this namespace; its locked flags must be kept
                mount(None, point, None, REMOUNT | BIND | RDONLY | sum(KEEP.get(o, 0) for o in f[5].split(",")))
            except OSError:
                writable.append(point)
        expose(job["python_paths"])
        owner = f",uid={uid},gid={uid}" if root else ""
        mount("tmpfs", box, "tmpfs", NOSUID | NODEV, f"size={job['disk_mb']}m,mode=0700" + owner)
        mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)  # only this namespace's processes
        iso.update(network="namespace", filesystem="read-only, tmpfs cwd" + (
            " (still writable: " + ", ".join(writable) + ")" if writable else ""))
    os.chdir(box)
    for name, soft in (("CPU", job["cpu_s"]), ("AS", job["memory_mb"] << 20), ("FSIZE", job["file_mb"] << 20),
                       ("NPROC", job["max_procs"]), ("NOFILE", job["max_files"]), ("CORE", 0)):
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, soft + 1 if name == "CPU" else soft))
    if root:
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
        iso.update(uid=uid, privileges="own uid")
    elif ns:  # root of its own user namespace: drop every capability there (header v3, empty sets)
        if libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()) != 0:
            raise OSError(ctypes.get_errno(), "capset")
        iso["privileges"] = "user namespace, no capabilities"
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no set-uid program (or root exec) can give privileges back
    if not ns:
        def deny(event, args):
            if event.startswith(("socket.", "ctypes.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                                 "os.fork", "os.kill", "subprocess.")):
                raise PermissionError(f"{event} is disabled in the sandbox")
        sys.addaudithook(deny)
    for name, text in job["files"].items():
        with open(name, "w") as f:
            f.write(text)
    os.write(report, (json.dumps(iso) + "\n").encode())
    os.close(report)
    import pytest
    return int(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "--no-header", "test_solution.py"]))

def kill_all(pid, ns):
    if ns:  # pid 1 of the namespace: the kernel kills the rest
        os.kill(pid, signal.SIGKILL)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if root and os.fork() == 0:  # the processes that left the group still run as the sandbox's own uid
        os.setuid(uid); os.kill(-1, signal.SIGKILL); os._exit(0)
    if root:
        os.wait()

ns = None
if job["namespaces"] and sys.platform == "linux":
    if root and libc.unshare(NEWNS | NEWNET | NEWPID) == 0:
        ns = "root"
    elif not root and libc.unshare(NEWUSER | NEWNS | NEWNET | NEWPID) == 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {outside_uid} 1"), ("gid_map", f"0 {outside_gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        ns = "user"
pid = os.fork()
if pid == 0:
    try:
        if not ns:
            os.setpgid(0, 0)
        os._exit(sandbox(ns))
    except BaseException as e:
        print(f"sandbox setup failed: {e!r}", flush=True)
        os._exit(3)
if not ns:
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
timed_out = []
signal.signal(signal.SIGALRM, lambda *_: (timed_out.append(1), kill_all(pid, ns)))
signal.setitimer(signal.ITIMER_REAL, job["timeout_s"])
status = os.waitpid(pid, 0)[1]
signal.setitimer(signal.ITIMER_REAL, 0)
if not ns and not timed_out:
    kill_all(pid, ns)  # what it left running
os.write(report, f"{124 if timed_out else os.waitstatus_to_exitcode(status)}\n".encode())
"""


class CodeVerifier:
    """Reward in {0, 1} for code: 1 when the completion's last Python block passes every test of its problem.

    Each sample runs in its own sandbox (see `_SANDBOX`): solution.py and test_solution.py in a fresh temporary
    directory, pytest, an empty environment, limits on CPU time, address space, file size, processes and open files,
    no network where the OS allows it, and everything it started killed at the wall-clock timeout. `workers` samples
    run at once, each under its own unprivileged uid when the trainer is root; `submit` returns a Future, so that a
    train loop can go on while a batch is graded. `isolation` reports what this machine enforces. Safe to call from
    any thread; never raises on model output."""

    UID_BASE = 61000  # uids 61000-61999 are claimed per worker with lock files: two verifiers never share one
    mode = "code"     # for `extract_answer`: evaluation votes over identical programs (maj@n)

    def __init__(self, workers: int = 4, timeout_s: float = 10.0, memory_mb: int = 2048, max_procs: int = 16,
                 file_mb: int = 16, disk_mb: int = 64, max_files: int = 256, namespaces: bool = True):
        import fcntl
        import queue
        import tempfile
        self.timeout_s = timeout_s
        self.job = {"namespaces": namespaces, "timeout_s": timeout_s, "cpu_s": max(1, math.ceil(timeout_s)),
                    "memory_mb": memory_mb, "max_procs": max_procs, "file_mb": file_mb, "disk_mb": disk_mb,
                    "max_files": max_files,
                    "python_paths": sorted({os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, *sys.path]
                                            if p and os.path.isdir(p)})}
        self.killed = self.errors = 0  # samples stopped at the timeout; sandboxes that never reached the tests
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="sandbox")
        self._outer = ThreadPoolExecutor(1, thread_name_prefix="sandbox-batch")
        self._slots, self._locks, self._lock = queue.Queue(), [], threading.Lock()
        self._isolation: dict | None = None
        if os.geteuid() != 0:
            for _ in range(workers):
                self._slots.put(-1)
            return
        for uid in range(self.UID_BASE, self.UID_BASE + 1000):
            lock = open(Path(tempfile.gettempdir()) / f"tandem-sandbox-uid-{uid}.lock", "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                continue
            self._locks.append(lock)
            self._slots.put(uid)
            if len(self._locks) == workers:
                return
        raise RuntimeError(f"could not claim {workers} free sandbox uids in {self.UID_BASE}-{self.UID_BASE + 999}")

    @property
    def isolation(self) -> dict:
        """What the sandbox enforces here (namespaces, uid, privileges, network, filesystem), from a trivial passing
        run; raises with the sandbox's output if even that fails."""
        if self._isolation is None:
            ok, out = self._run_one("def f():\n    return 1\n", "from solution import f\n\n\ndef test_f():\n"
                                    "    assert f() == 1\n", verbose=True)
            if not ok:
                raise RuntimeError(f"the code sandbox fails a trivial passing test. Without namespaces its uid must "
                                   f"be able to read Python ({sys.base_prefix}, {sys.prefix}). Its output:\n{out}")
        return dict(self._isolation)

    def close(self) -> None:
        self._outer.shutdown()
        self._pool.shutdown()
        for lock in self._locks:
            lock.close()

    def __call__(self, completions: list[str], tests: list) -> list[float]:
        codes = [last_code_block(c) for c in completions]
        futures = [self._pool.submit(self._run_one, code, t) if code else None for code, t in zip(codes, tests)]
        return [f.result() if f else 0.0 for f in futures]

    def submit(self, completions: list[str], tests: list):
        """A Future of `self(completions, tests)`: the samples start at once and the caller goes on."""
        return self._outer.submit(self, completions, tests)

    def _run_one(self, code: str, tests, verbose: bool = False):
        import tempfile
        uid = self._slots.get()
        run = Path(tempfile.mkdtemp(prefix="tandem-sandbox-"))
        read_fd, write_fd = os.pipe()
        try:
            run.chmod(0o711)  # the sandbox may pass through to its box, never list or write here
            box = run / "box"
            box.mkdir(mode=0o700)
            if uid >= 0:
                os.chown(box, uid, uid)
            job = {**self.job, "dir": str(box), "uid": uid, "report_fd": write_fd,
                   "files": {"solution.py": code, "test_solution.py": tests_source(tests), "pytest.ini": "[pytest]\n"}}
            env = {"HOME": str(box), "TMPDIR": str(box), "LANG": "C.UTF-8", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
                   "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            with open(run / "out.txt", "wb") as out:
                proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _SANDBOX], stdin=subprocess.PIPE,
                                        stdout=out, stderr=subprocess.STDOUT, cwd=box, env=env, pass_fds=(write_fd,),
                                        start_new_session=True)
            os.close(write_fd)
            write_fd = -1
            try:
                proc.stdin.write(json.dumps(job).encode())
                proc.stdin.close()
                proc.wait(timeout=self.timeout_s + 10.0)  # a backstop: the sandbox keeps its own time
            except (subprocess.TimeoutExpired, OSError):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            with os.fdopen(read_fd, "rb") as f:
                read_fd = -1
                lines = f.read(1 << 16).decode(errors="replace").splitlines()
            reached = bool(lines) and lines[0].startswith("{")  # the set-up reported before the tests ran
            if reached and self._isolation is None:
                self._isolation = json.loads(lines[0])
            with self._lock:
                self.errors += not reached
                self.killed += lines[-1:] == ["124"]
            ok = reached and lines[1:] == ["0"]
            if verbose:
                return ok, (run / "out.txt").read_bytes()[:8192].decode(errors="replace")
            return 1.0 if ok else 0.0
        finally:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(run, ignore_errors=True)
            self._slots.put(uid)
