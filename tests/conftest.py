"""Shared test setup: offline hub, the toy world's warm starts built once, and a runner for the scripts."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "benchmarks"
os.environ["HF_HUB_OFFLINE"] = "1"          # a hub name must fail at once, never retry for 20-50 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def warm():
    """Paths of the tiny warm starts the tests run (built once per cache, ~10 minutes on 2 cores the first time;
    tiny:wide is tiny:small widened to Qwen's vocabulary, seconds).
    The interference worlds (tiny:formats, tiny:cue_*) are left out: only CoPD's studies run them; tests check their
    targets without building them."""
    import tiny
    return {size: tiny.warm_start(size) for size in ("small", "large", "habits", "base", "hasty", "wide")}


def run_script(script: str, *args: str, nproc: int = 0, timeout: int = 900, check: bool = True,
               env: dict | None = None, hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run a script as a user would: `python script ...`, or `torchrun --nproc_per_node N script ...`. `hide` makes
    those packages unimportable in it, as on a machine that does not have them."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    if hide:
        assert not nproc, "hide runs the script under plain python"
        launch += ["-c", f"import runpy, sys; sys.modules.update(dict.fromkeys({list(hide)!r})); "
                         f"sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([*launch, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finite(row: dict) -> bool:
    return all(math.isfinite(v) for v in row.values() if isinstance(v, (int, float)))


def stop_after(full: Path, stopped: Path, step: int, copy: tuple[str, ...] = ()) -> None:
    """Make `stopped` the run directory `full` would have been had it stopped right after `step`: its checkpoint
    (or the given paths under `full`) and the metrics and eval rows logged up to that step."""
    for c in copy or (f"checkpoints/step_{step}",):
        (stopped / c).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (full / c).is_dir() else shutil.copy)(full / c, stopped / c)
    for name in ("metrics.jsonl", "eval.jsonl"):
        if (full / name).exists():
            (stopped / name).write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(full / name)
                                                if r["step"] <= step))


def without_timing(row: dict) -> dict:
    """A metrics row without its wall-clock entries, the only ones an exact resume may change."""
    return {k: v for k, v in row.items() if not k.startswith(("timing_s/", "perf/"))}
