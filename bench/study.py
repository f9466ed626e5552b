"""Run a script under several configurations and seeds, and tabulate final held-out accuracy as mean ± std.

    python bench/study.py kdrl.py --seeds 0 1 2 \\
        --config "GRPO=--kd-coef 0 --teacher none" --config "KD-RKL=--rl-coef 0" --config "KDRL=" \\
        -- --preset tiny --eval-every 0

Every run writes to bench/out/<study>/<config>-s<seed>/; the table (markdown) and the raw numbers (JSON) go to
bench/out/<study>/. A finished run with the same command is reused, so an interrupted study resumes. The metric is
each benchmark's avg@n at the last evaluated step, averaged over benchmarks (`mean`), next to the same model's step-0
evaluation where the run logged one. `--tags "" large` adds a table for the eval rows a script tags (e.g. the second
model that codistill_grpo.py evaluates). `--baseline NAME` adds the paired difference to that config (per seed, then
mean ± std over seeds). `--metrics KEY ...` adds each key's mean over a run's logged steps (metrics.jsonl), e.g.
reward/frac_zero_std to show a precondition. `--jobs N` runs N at once, each with cores/N threads. `--grid` adds the
product of axes of configs, e.g. two levels times two coefficients (four configs, named seq-c0.1, seq-c1, ...):

    python bench/study.py codistill_grpo.py --config "GRPO=--kd-coef 0" --baseline GRPO \\
        --grid "seq=--kd-level seq_mean|tok=--kd-level token" --grid "c0.1=--kd-coef 0.1|c1=--kd-coef 1" -- --preset tiny

A study runs in parts by giving fewer seeds or axis values: every run it shares with the full command is reused.
"""

import argparse
import concurrent.futures
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def final_eval(run: Path, tag: str = "") -> tuple[dict, dict]:
    rows = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("tag", "") == tag]
    if not rows:
        return {}, {}
    last = max(r["step"] for r in rows)

    def acc(step):
        out = {}
        for r in rows:
            if r["step"] == step:
                out[r["benchmark"]] = next(v for k, v in r.items() if k.startswith("avg@") and not k.endswith("_se"))
                out[r["benchmark"] + ":length"] = r["mean_length"]
        return out

    return acc(last), (acc(0) if any(r["step"] == 0 for r in rows) else {})


def run_metrics(run: Path, keys: list[str]) -> dict:
    """Each key's mean over the run's logged steps (steps that did not log it are skipped)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        if vals:
            out[k] = statistics.mean(vals)
    return out


def fmt(xs: list[float], signed: bool = False) -> str:
    m = f"{statistics.mean(xs):+.3f}" if signed else f"{statistics.mean(xs):.3f}"
    return f"{m} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else m


def main() -> None:
    argv = sys.argv[1:]
    common_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("script")
    ap.add_argument("--config", action="append", default=[], help="NAME=extra flags (may be empty)")
    ap.add_argument("--grid", action="append", default=[], help="an axis 'NAME=flags|NAME=flags|...': the configs "
                    "are the product of all axes, names joined by '-', flags concatenated")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--name", default="")
    ap.add_argument("--nproc", type=int, default=0, help="run each under torchrun with this many ranks")
    ap.add_argument("--tags", nargs="+", default=[""], help="eval rows to tabulate: '' (untagged) and/or tags")
    ap.add_argument("--baseline", default="", help="config to pair every other config with, seed by seed")
    ap.add_argument("--metrics", nargs="+", default=[], help="metrics.jsonl keys to average over each run's steps")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores/jobs threads)")
    a = ap.parse_args(argv)
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, a.jobs))
    study = ROOT / "bench" / "out" / (a.name or Path(a.script).stem)
    study.mkdir(parents=True, exist_ok=True)
    results, todo = {}, []
    axes = [[c.strip().partition("=")[::2] for c in axis.split("|")] for axis in a.grid]
    configs = a.config + ["-".join(n for n, _ in combo) + "=" + " ".join(f for _, f in combo if f)
                          for combo in (itertools.product(*axes) if axes else [])]
    if not configs:
        ap.error("give at least one --config or --grid")
    for cfg in configs:
        name, _, flags = cfg.partition("=")
        for seed in a.seeds:
            run = study / f"{name}-s{seed}"
            launch = [sys.executable] if not a.nproc else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]
            cmd = [*launch, str(ROOT / a.script), *common_args, *shlex.split(flags), "--seed", str(seed),
                   "--output-dir", str(run), "--overwrite"]
            todo.append((name, seed, run, cmd))

    def execute(job) -> None:
        name, seed, run, cmd = job
        t0 = time.time()
        done = run / "final" / "config.json"
        if done.exists() and (run / "cmd.txt").exists() and (run / "cmd.txt").read_text() == shlex.join(cmd):
            print(f"{name} seed {seed}: reusing the finished run in {run}", flush=True)  # resumable study
            return
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads // max(1, a.nproc) or 1)}
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if p.returncode:
            raise RuntimeError(f"{name} seed {seed} failed:\n{p.stderr[-4000:]}")
        (run / "cmd.txt").write_text(shlex.join(cmd))
        (run / "wall_s.txt").write_text(f"{time.time() - t0:.1f}")

    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        for f in [pool.submit(execute, job) for job in todo]:
            try:
                f.result()
            except RuntimeError as e:
                sys.exit(str(e))
    for name, seed, run, _ in todo:
        wall = float((run / "wall_s.txt").read_text()) if (run / "wall_s.txt").exists() else float("nan")
        extra = run_metrics(run, a.metrics)
        for tag in a.tags:
            last, first = final_eval(run, tag)
            if last:
                results.setdefault(tag, {}).setdefault(name, []).append(
                    {"seed": seed, "final": last, "start": first, "wall_s": wall, "metrics": extra})
        last = final_eval(run, a.tags[0])[0]
        print(f"{name} seed {seed}: " + " ".join(f"{k}={v:.3f}" for k, v in last.items() if ":" not in k) +
              f" ({wall:.0f}s)", flush=True)
    tables = []
    for tag, by_config in results.items():
        benches = sorted(k for k in next(iter(by_config.values()))[0]["final"] if ":" not in k)
        paired = f" | Δ vs {a.baseline} (paired)" if a.baseline in by_config else ""
        lines = ([f"eval rows tagged `{tag}`:", ""] if tag else []) + [
            "| config | " + " | ".join(benches) + " | mean | Δ vs step 0" + paired + " | response length | " +
            "".join(f"{k} | " for k in a.metrics) + "wall s |",
            "|---" * (len(benches) + 5 + bool(paired) + len(a.metrics)) + "|"]

        def mean_acc(r):
            return statistics.mean(r["final"][b] for b in benches)

        base = {r["seed"]: mean_acc(r) for r in by_config.get(a.baseline, [])}
        for name, runs in by_config.items():
            means = [mean_acc(r) for r in runs]
            deltas = [m - statistics.mean(r["start"][b] for b in benches) for m, r in zip(means, runs) if r["start"]]
            length = [statistics.mean(r["final"][b + ":length"] for b in benches) for r in runs]
            pair = [mean_acc(r) - base[r["seed"]] for r in runs if r["seed"] in base]
            cell = "" if not paired else (" | -" if name == a.baseline or not pair else f" | {fmt(pair, signed=True)}")
            extra = "".join(f"{fmt([r['metrics'][k] for r in runs if k in r['metrics']])} | "
                            if any(k in r["metrics"] for r in runs) else "- | " for k in a.metrics)
            lines.append(f"| {name} | " + " | ".join(fmt([r["final"][b] for r in runs]) for b in benches) +
                         f" | {fmt(means)} | {fmt(deltas, signed=True) if deltas else '-'}{cell} | "
                         f"{statistics.mean(length):.1f} | {extra}{statistics.mean(r['wall_s'] for r in runs):.0f} |")
        tables.append("\n".join(lines))
    table = "\n\n".join(tables)
    if a.tags == [""]:
        results = results[""]  # the raw numbers keep their old shape when only untagged rows are asked for
    (study / "results.json").write_text(json.dumps(results, indent=1))
    (study / "table.md").write_text(f"`{' '.join(sys.argv)}`, seeds {a.seeds}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
