"""The Sparse-to-Dense study on the toy world: the full workflow against cold GRPO at equal student-side steps, the
paper's three ablations and the stage-3 replay control, over seeds; mean ± std of held-out accuracy.

    python bench/sparse_to_dense_study.py --seeds 0 1 2 --jobs 3 -- --preset tiny --eval-every 0 --eval-limit 64

Each stage's output is a deterministic function of (seed, its input models): stage 1 has no inputs but the raw
teacher, every stage seeds its own data order and rollouts by (seed, stage, step), never by the position of the
stage in the run. So the ablations that keep stage 1 reuse the full run's stage outputs instead of recomputing them:
`--stages 2b,3 --teacher FULL/stage_1` is exactly `--stages 1,2b,3`, and `--stages 3 --model FULL/stage_2a` is
exactly `--stages 1,2a,3`. Runs go to bench/out/sparse_to_dense/<config>-s<seed>/; the table (markdown) and the raw
numbers (JSON) to bench/out/sparse_to_dense/ (--name: another folder).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def configs(full: Path, student_steps: int) -> dict[str, list[str]]:
    """Config name -> flags; {full} is the full workflow's run directory of the same seed."""
    return {
        "full workflow (1, 2a, 2b, 3)": ["--stages", "1,2a,2b,3", "--eval-every", "100000"],  # + both at the start
        "cold GRPO (3 on all labels)": ["--stages", "3", "--stage3-data", "all", "--steps-3", str(student_steps),
                                        "--eval-every", str(student_steps)],  # also evaluates the warm start
        "raw teacher (2a, 2b, 3)": ["--stages", "2a,2b,3"],
        "no warmup (1, 2b, 3)": ["--stages", "2b,3", "--teacher", str(full / "stage_1")],
        "no OPD (1, 2a, 3)": ["--stages", "3", "--model", str(full / "stage_2a")],
        "bridge + replay control (1, 2a, 2b, 3 replay)": ["--stages", "3", "--stage3-data", "replay", "--model",
                                                          str(full / "stage_2b")],
    }


def accuracy(row: dict) -> float:
    """A benchmark's avg@n in an eval row (not its standard error, avg@n_se)."""
    return next(v for k, v in row.items() if k.startswith("avg@") and not k.endswith("_se"))


def mean_acc(res: dict) -> float:
    return statistics.mean(accuracy(r) for r in res.values())


def run(name: str, seed: int, flags: list[str], common: list[str], root: Path) -> dict:
    out = root / f"{name.split(' (')[0].replace(' ', '_').replace('+', 'plus')}-s{seed}"
    cmd = [sys.executable, str(ROOT / "sparse_to_dense.py"), *common, *flags, "--seed", str(seed),
           "--output-dir", str(out), "--overwrite"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode:
        sys.exit(f"{name} seed {seed} failed:\n{p.stderr[-4000:]}")
    stages = {}
    for f in sorted(out.glob("stage_*.json")):
        s = json.loads(f.read_text())
        stages[s["stage"]] = mean_acc(s["eval"])
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines() if x.strip()]
    for key, tag in (("start", ""), ("teacher start", "teacher")):
        start = [accuracy(e) for e in evals if e["step"] == 0 and e.get("tag", "") == tag]
        if start:
            stages[key] = statistics.mean(start)
    print(f"{name} seed {seed}: {stages} ({time.time() - t0:.0f}s)", flush=True)
    return {"out": str(out), "stages": stages, "final": stages[flags[flags.index("--stages") + 1].split(",")[-1]],
            "wall_s": time.time() - t0}


def fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    argv = sys.argv[1:]
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (timings then include their contention)")
    ap.add_argument("--student-steps", type=int, default=40, help="cold GRPO steps: the full workflow's 2a + 2b + 3")
    ap.add_argument("--name", default="sparse_to_dense", help="folder under bench/out")
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    # each run gets its share of the cores: more threads than cores made every process several times slower
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // a.jobs)))
    root = ROOT / "bench" / "out" / a.name
    root.mkdir(parents=True, exist_ok=True)
    names = list(configs(Path("."), a.student_steps))
    full_name, independent = names[0], names[1:3]

    def chain(seed: int) -> dict:
        """The full run, then the ablations that read its stage outputs."""
        res = {full_name: run(full_name, seed, configs(Path("."), a.student_steps)[full_name], common, root)}
        cfg = configs(Path(res[full_name]["out"]), a.student_steps)
        for name in names[3:]:
            res[name] = run(name, seed, cfg[name], common, root)
        return res

    with ThreadPoolExecutor(a.jobs) as pool:
        chains = {seed: pool.submit(chain, seed) for seed in a.seeds}
        singles = {(n, seed): pool.submit(run, n, seed, configs(Path("."), a.student_steps)[n], common, root)
                   for n in independent for seed in a.seeds}
        results = {n: [] for n in names}
        for seed in a.seeds:
            for n, r in chains[seed].result().items():
                results[n].append({"seed": seed, **r})
            for n in independent:
                results[n].append({"seed": seed, **singles[(n, seed)].result()})

    lines = ["| config | teacher at start | teacher after 1 | student at start | after 2a | after 2b | final student | Δ vs full | "
             "wall s |", "|---|---|---|---|---|---|---|---|---|"]
    full_by_seed = {r["seed"]: r["final"] for r in results[full_name]}
    for n in names:
        runs = results[n]

        def col(stage):
            xs = [r["stages"][stage] for r in runs if stage in r["stages"]]
            return fmt(xs) if xs else "-"
        lines.append(f"| {n} | {col('teacher start')} | {col('1')} | {col('start')} | {col('2a')} | {col('2b')} | {fmt([r['final'] for r in runs])} | "
                     f"{fmt([r['final'] - full_by_seed[r['seed']] for r in runs]) if n != full_name else '-'} | "
                     f"{statistics.mean(r['wall_s'] for r in runs):.0f} |")
    table = "\n".join(lines)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    (root / "table.md").write_text(f"`{' '.join(sys.argv)}`, seeds {a.seeds}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
