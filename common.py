"""Shared, paper-agnostic pieces of the tandem scripts: verifiers (math answers, sandboxed code), GRPO/KD math,
token log-probs and KLs in chunks, data, evaluation. The run-time plumbing (distributed, FSDP2, rollout engines,
logging, checkpoints) is in `runtime.py`. No paper's objective lives in either file: each script shows its own.

Tensor names carry shape suffixes: P prompts, G completions per prompt, B sequences (= P*G on a rank),
T tokens (prompt + response, right-padded), V vocabulary, N response tokens flattened, H hidden size.
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
                    else:
                        self._kill(w)
                    del busy[w]
                elif time.monotonic() >= deadline:
                    self._kill(w)
                    self.killed += 1
                    scores[i] = 0.0
                    del busy[w]


# ----------------------------------------------------------------------------------------------------------
# 1b. Code verifier: the completion's last Python block against the problem's tests, in a sandboxed subprocess
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


# ----------------------------------------------------------------------------------------------------------
# 2. GRPO / KD math on per-token tensors
# ----------------------------------------------------------------------------------------------------------
def group_advantages(rewards_PG: torch.Tensor, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_G r) / (std_G r + eps); Dr. GRPO (`scale="none"`): A_i = r_i - mean_G r."""
    centered_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if scale == "none":
        return centered_PG
    if scale != "std":
        raise ValueError(f"unknown advantage scale {scale!r}; use 'std' (GRPO) or 'none' (Dr. GRPO)")
    std_P1 = rewards_PG.std(dim=1, keepdim=True) if rewards_PG.shape[1] > 1 else torch.zeros_like(rewards_PG[:, :1])
    return centered_PG / (std_P1 + eps)


def ppo_clip_loss(logp_BT, old_logp_BT, adv_BT, clip_low: float, clip_high: float):
    """PPO-clip surrogate with separate low/high clip (DAPO clip-higher). Returns the per-token loss
    -min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A) and the boolean maps of tokens clipped low and high."""
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    with torch.no_grad():
        low_BT = (ratio_BT < 1.0 - clip_low) & (adv_BT < 0)
        high_BT = (ratio_BT > 1.0 + clip_high) & (adv_BT > 0)
    return loss_BT, low_BT, high_BT


def truncated_is_weights(logp_target_BT, logp_behavior_BT, cap: float) -> torch.Tensor:
    """Token-level truncated importance weights min(pi_target / pi_behavior, cap), detached (TIS)."""
    return torch.exp(logp_target_BT - logp_behavior_BT).clamp(max=cap).detach()


def kl_estimate(logp_BT, ref_logp_BT, kind: str) -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) on tokens sampled from pi (http://joschu.net/blog/kl-approx.html).
    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r, with log r = logp - ref_logp (clamped to
    +-20 so that one wild token cannot overflow k3)."""
    log_r_BT = (logp_BT - ref_logp_BT).clamp(-20.0, 20.0)
    if kind == "k1":
        return log_r_BT
    if kind == "k2":
        return 0.5 * log_r_BT ** 2
    if kind == "k3":
        return torch.exp(-log_r_BT) - 1.0 + log_r_BT
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def kl_from_logits(logits_p_NV, logits_q_NV) -> torch.Tensor:
    """Exact KL(p || q) per row over the full vocabulary, from logits (computed in float32)."""
    logp_NV, logq_NV = logits_p_NV.float().log_softmax(-1), logits_q_NV.float().log_softmax(-1)
    return (logp_NV.exp() * (logp_NV - logq_NV)).sum(-1)


LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def agg_loss(loss_BT, mask_BT, mode: str, norm: "LossNorm") -> torch.Tensor:
    """Reduce a micro-batch's per-token loss to a scalar such that summing over micro-batches, then averaging
    over ranks (as FSDP does with gradients), gives exactly the `mode` mean over the whole global batch:
      token-mean               sum_bt l*m / (global #tokens)                  (DAPO; TRL "dapo", verl default)
      seq-mean-token-mean      mean_b [ sum_t l*m / #tokens_b ]               (original GRPO)
      seq-mean-token-sum-norm  mean_b [ sum_t l*m / max_new_tokens ]          (Dr. GRPO)"""
    if mode == "token-mean":
        return (loss_BT * mask_BT).sum() / norm.tokens
    if mode == "seq-mean-token-mean":
        return ((loss_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1)).sum() / norm.seqs
    if mode == "seq-mean-token-sum-norm":
        return ((loss_BT * mask_BT).sum(1) / norm.max_len).sum() / norm.seqs
    raise ValueError(f"unknown loss aggregation {mode!r}; use one of {LOSS_AGGS}")


@dataclass
class LossNorm:
    """Denominators of `agg_loss` for one optimizer step: global counts divided by the world size."""
    tokens: float
    seqs: float
    max_len: int

    @staticmethod
    def of(masks: list[torch.Tensor], max_len: int) -> "LossNorm":
        """From the response masks of all micro-batches of one optimizer step on this rank."""
        import torch.distributed as dist
        counts = torch.tensor([sum(m.sum().item() for m in masks), float(sum(m.shape[0] for m in masks))],
                              dtype=torch.float64)
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            counts = counts.to(masks[0].device)
            dist.all_reduce(counts)
        return LossNorm(tokens=max(counts[0].item(), 1.0) / world, seqs=counts[1].item() / world, max_len=max_len)


# ----------------------------------------------------------------------------------------------------------
# 3. Token log-probs and full-vocabulary KLs, computed from hidden states in chunks of tokens
# ----------------------------------------------------------------------------------------------------------
# A [B, T, V] logits tensor at V = 151,936 is 4.9 GB per 8K tokens in float32; two models' worth is what OOMs
# distillation runs. So the model runs without its LM head (`logits_to_keep=1`), the final hidden states of the
# positions that predict response tokens are gathered to [N, H], and the head + log-softmax run on `chunk`
# tokens at a time, recomputed in backward (activation checkpointing) so that only [chunk, V] ever exists.

@dataclass
class Batch:
    """Prompt + response token ids, right-padded: `ids_BT`; 1.0 on response tokens (the policy's actions):
    `mask_BT`. Every per-token tensor of a step lives on this same [B, T] grid."""
    ids_BT: torch.Tensor
    mask_BT: torch.Tensor

    @staticmethod
    def of(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> "Batch":
        T = max(len(p) + len(r) for p, r in zip(prompts, responses))
        ids_BT = torch.full((len(prompts), T), pad_id, dtype=torch.long)
        mask_BT = torch.zeros((len(prompts), T))
        for b, (p, r) in enumerate(zip(prompts, responses)):
            ids_BT[b, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            mask_BT[b, len(p):len(p) + len(r)] = 1.0
        return Batch(ids_BT.to(device), mask_BT.to(device))

    def micro_batches(self, size: int):
        """(row slice, micro-batch trimmed to its own longest sequence) pairs; index [B, T] tensors with
        `x_BT[rows, :mb.T]`."""
        # a row ends right after its last response token (prompt and response are contiguous, pads after)
        end_B = torch.where(self.mask_BT.any(1), self.T - self.mask_BT.flip(1).argmax(1), 1)
        for i in range(0, self.ids_BT.shape[0], size):
            rows = slice(i, i + size)
            T = int(end_B[rows].max())
            yield rows, Batch(self.ids_BT[rows, :T], self.mask_BT[rows, :T])

    @property
    def T(self) -> int:
        return self.ids_BT.shape[1]


def response_hidden(model, batch: Batch) -> torch.Tensor:
    """Final (normed) hidden states [N, H] at the positions whose next token is a response token."""
    captured = {}

    def grab(module, args, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    handle = model.get_decoder().register_forward_hook(grab)
    try:
        # Right padding needs no attention mask: causal attention never looks at the pads after a sequence,
        # and the positions 0..len-1 match the rollout engine's. `logits_to_keep=1` skips the full LM head.
        model(input_ids=batch.ids_BT, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    h_BTH = captured["h"]
    return h_BTH[:, :-1][batch.mask_BT[:, 1:].bool()]


def response_grid(prompts: list[list[int]], values: list[list[float]], T: int, device) -> torch.Tensor:
    """Per-response-token values (e.g. a rollout engine's log-probs) placed on the [B, T] grid of `Batch.of`."""
    x_BT = torch.zeros((len(prompts), T))
    for b, (p, v) in enumerate(zip(prompts, values)):
        x_BT[b, len(p):len(p) + len(v)] = torch.tensor(v, dtype=torch.float32)
    return x_BT.to(device)


def response_targets(batch: Batch) -> torch.Tensor:
    return batch.ids_BT[:, 1:][batch.mask_BT[:, 1:].bool()]


def to_grid(x_N: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Scatter per-response-token values [N] back onto the batch's [B, T] grid (zeros elsewhere)."""
    sel = batch.mask_BT[:, 1:].bool()
    return F.pad(torch.zeros(sel.shape, dtype=x_N.dtype, device=x_N.device).masked_scatter(sel, x_N), (1, 0))


def _head_logits(h_nH, head, vocab: int, temperature: float) -> torch.Tensor:
    w = head.weight[:vocab]  # Qwen pads the embedding past len(tokenizer): those ids are never real tokens
    b = head.bias[:vocab] if head.bias is not None else None
    return F.linear(h_nH, w, b).float() / temperature


def _chunked(fn, tensors: list[torch.Tensor], chunk: int) -> torch.Tensor:
    """Apply fn to row-chunks of `tensors`, recomputing each chunk in backward when gradients are needed."""
    outs = []
    for i in range(0, tensors[0].shape[0], chunk):
        part = [t[i:i + chunk] for t in tensors]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in part)
        outs.append(checkpoint(fn, *part, use_reentrant=False) if needs_grad else fn(*part))
    return torch.cat(outs) if outs else tensors[0].new_zeros((0,), dtype=torch.float32)


def logprobs_from_hidden(h_NH, head, targets_N, vocab: int, temperature: float = 1.0, chunk: int = 1024):
    """log pi(y_n | s_n) [N] of the given tokens, and the entropy of pi(. | s_n) [N] (detached, for metrics)."""
    def fn(h, y):
        logp_nV = _head_logits(h, head, vocab, temperature).log_softmax(-1)
        with torch.no_grad():
            ent_n = -(logp_nV.exp() * logp_nV).sum(-1)
        return torch.stack([logp_nV.gather(1, y[:, None]).squeeze(1), ent_n], 1)

    out_N2 = _chunked(fn, [h_NH, targets_N], chunk)
    if out_N2.ndim == 1:
        return out_N2, out_N2
    return out_N2[:, 0], out_N2[:, 1].detach()


def kl_from_hidden(h_NH, head, h_ref_NH, head_ref, vocab: int, direction: str, chunk: int = 1024):
    """Exact per-position KL over the shared vocabulary between the model (grad) and a reference (no grad):
    `reverse` = KL(pi || pi_ref) (on-policy distillation), `forward` = KL(pi_ref || pi) (supervised KD)."""
    if direction not in ("reverse", "forward"):
        raise ValueError(f"unknown KL direction {direction!r}; use 'reverse' or 'forward'")

    def fn(h, h_ref):
        logits_nV = _head_logits(h, head, vocab, 1.0)
        with torch.no_grad():
            ref_nV = _head_logits(h_ref, head_ref, vocab, 1.0)
        return kl_from_logits(logits_nV, ref_nV) if direction == "reverse" else kl_from_logits(ref_nV, logits_nV)

    return _chunked(fn, [h_NH, h_ref_NH], chunk)


def token_logprobs(model, batch: Batch, vocab: int, temperature: float = 1.0, chunk: int = 1024):
    """[B, T] log-probs of the response tokens under `model` (zeros off the response) and [B, T] entropies."""
    h_NH = response_hidden(model, batch)
    logp_N, ent_N = logprobs_from_hidden(h_NH, model.get_output_embeddings(), response_targets(batch), vocab,
                                         temperature, chunk)
    return to_grid(logp_N, batch), to_grid(ent_N, batch)


@torch.no_grad()
def score_logprobs(model, batch: Batch, vocab: int, temperature: float, micro_batch_size: int,
                   chunk: int = 1024) -> torch.Tensor:
    """[B, T] log-probs of the response tokens under `model` as it is now, without gradient, one micro-batch at a
    time: the pre-update π_old of a multi-minibatch update, or a frozen / partner model's scores."""
    out_BT = torch.zeros_like(batch.mask_BT)
    for rows, mb in batch.micro_batches(micro_batch_size):
        out_BT[rows, :mb.T] = token_logprobs(model, mb, vocab, temperature, chunk)[0]
    return out_BT


# ----------------------------------------------------------------------------------------------------------
# 4. Data: problems from the toy world, a local jsonl file or folder, or the hub
# ----------------------------------------------------------------------------------------------------------
_DAPO_HEAD = re.compile(r"^Solve the following math problem step by step\..*?\n\n", re.S)
_DAPO_TAIL = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")


def strip_dapo_wrapper(problem: str) -> str:
    """The bare problem of a DAPO-Math-17k row: DAPO wraps each problem in an instruction to end with "Answer: ...",
    which contradicts a \\boxed{} prompt template. Other problems pass unchanged."""
    return _DAPO_TAIL.sub("", _DAPO_HEAD.sub("", problem)).strip()


def load_problems(source: str, split: str = "train", problem_key: str = "problem", answer_key: str = "answer",
                  limit: int = 0, seed: int = 0) -> list[dict]:
    """Rows {"problem", "answer", ...} from `tiny:<families>`, a .jsonl file, or a hub dataset `org/name[:config]`.
    `limit` keeps the first rows (the toy world generates exactly `limit`, default 512)."""
    if source.startswith("tiny:"):
        import tiny
        return tiny.make_split(source[5:], "test" if split == "test" else "train", limit or 512, seed)
    if source.endswith(".jsonl"):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data file {source} does not exist")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        import datasets
        name, _, config = source.partition(":")
        try:
            rows = list(datasets.load_dataset(name, config or None, split=split))
        except Exception as e:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise RuntimeError(f"could not load dataset {source!r} (split {split!r}): {e}. "
                               + ("HF_HUB_OFFLINE=1 is set, so hub names only work from the local cache; "
                                  "pass a .jsonl path instead." if offline else
                                  "Check the name, or pass a local .jsonl file.")) from e
    if not rows:
        raise ValueError(f"dataset {source!r} split {split!r} is empty")
    missing = [k for k in (problem_key, answer_key) if k not in rows[0]]
    if missing:
        raise KeyError(f"dataset {source!r} has no column {missing[0]!r} (columns: {sorted(rows[0])}); "
                       f"pass --problem-key / --answer-key to name the right ones")
    rows = [{**r, "problem": str(r[problem_key]), "answer": str(r[answer_key])} for r in rows]
    return rows[:limit] if limit else rows


def encode_prompt(tokenizer, problem: str, template: str, max_tokens: int = 0, chat: bool = True) -> list[int]:
    """Token ids of the prompt: `template` with {problem} filled in, as one user message of the tokenizer's chat
    template, or (`chat=False`) as the raw prompt text, the way base-model templates such as R1-Zero's are used."""
    text = template.format(problem=problem)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=not chat).input_ids  # raw text: the tokenizer's BOS, if it has one
    return ids[-max_tokens:] if max_tokens and len(ids) > max_tokens else ids


class PromptStream:
    """Shuffled epochs over the training problems. Each step takes the next `per_step` rows of the global order,
    and rank r keeps rows r, r+world, ...: the global batch is the same whatever the world size, and all G
    completions of a prompt stay on one rank. Its position is checkpointed so that --resume continues exactly."""

    def __init__(self, rows: list[dict], per_step: int, rank: int, world: int, seed: int):
        if per_step % world:
            raise ValueError(f"--prompts-per-step {per_step} does not divide by the world size {world}; "
                             f"use a multiple of {world}")
        if len(rows) < per_step:
            raise ValueError(f"the training set has {len(rows)} problems, fewer than --prompts-per-step {per_step}")
        self.rows, self.per_step, self.rank, self.world, self.seed = rows, per_step, rank, world, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def next(self) -> list[dict]:
        if self.pos + self.per_step > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm()
        idx = self._order[self.pos:self.pos + self.per_step]
        self.pos += self.per_step
        return [self.rows[i] for i in idx[self.rank::self.world]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm()


# ----------------------------------------------------------------------------------------------------------
# 5. Evaluation: avg@n, unbiased pass@k, maj@n and response length per benchmark
# ----------------------------------------------------------------------------------------------------------
BENCHMARKS = {  # name -> (hub dataset, split, problem column, answer column); the file DIR/<name>.jsonl wins
    "math500": ("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    "aime24": ("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": ("math-ai/aime25", "test", "problem", "answer"),
    "amc23": ("math-ai/amc23", "test", "question", "answer"),
    "minerva_math": ("math-ai/minervamath", "test", "question", "answer"),
    "olympiadbench": ("math-ai/olympiadbench", "test", "question", "final_answer"),
    "gsm8k": ("openai/gsm8k:main", "test", "question", "answer"),
}


def load_benchmarks(spec: str, data_dir: str = "", limit: int = 0) -> dict[str, list[dict]]:
    """`spec` is comma-separated: benchmark names (from `data_dir`/<name>.jsonl if present, else the hub),
    .jsonl paths, or `tiny_<family>` (the toy world's held-out problems of one task family)."""
    out = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item.startswith("tiny_"):
            out[item] = load_problems(f"tiny:{item[5:]}", "test", limit=limit or 128)
        elif item.endswith(".jsonl"):
            out[Path(item).stem] = load_problems(item, limit=limit)
        elif data_dir and (Path(data_dir) / f"{item}.jsonl").exists():
            out[item] = load_problems(str(Path(data_dir) / f"{item}.jsonl"), limit=limit)
        elif item in BENCHMARKS:
            hub, split, pk, ak = BENCHMARKS[item]
            out[item] = load_problems(hub, split, pk, ak, limit=limit)
        else:
            raise ValueError(f"unknown benchmark {item!r}: use one of {sorted(BENCHMARKS)}, a .jsonl path, "
                             f"tiny_<family>, or put {item}.jsonl in --eval-data-dir")
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def summarize_eval(per_problem: list[dict], ks: list[int]) -> dict:
    """Benchmark metrics from per-problem records {"correct": [0/1]*n, "answers": [str|None]*n,
    "lengths": [int]*n}: avg@n, pass@k for each k <= n, maj@n (majority vote over extracted answers), length."""
    n = len(per_problem[0]["correct"])
    out = {f"avg@{n}": sum(sum(p["correct"]) / n for p in per_problem) / len(per_problem)}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(n, sum(p["correct"]), k) for p in per_problem) / len(per_problem)
    maj = 0.0
    for p in per_problem:
        votes = Counter(normalize_answer(a) for a in p["answers"] if a is not None)
        if votes:
            top = votes.most_common(1)[0][0]
            maj += next(c for a, c in zip(p["answers"], p["correct"]) if a is not None and normalize_answer(a) == top)
    out[f"maj@{n}"] = maj / len(per_problem)
    out["mean_length"] = sum(sum(p["lengths"]) / n for p in per_problem) / len(per_problem)
    return out
