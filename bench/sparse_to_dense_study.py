"""The Sparse-to-Dense study on the toy world, as the paper's route table (Table 1, with Table 3's raw-teacher
transfer): every route at equal student-side steps, over seeds; mean ± std of held-out accuracy and the paper's
orderings as per-seed paired differences.

    python bench/sparse_to_dense_study.py --seeds 0 1 2 --jobs 2 -- --preset tiny --eval-every 0 --eval-limit 64

Routes (S = --student-steps, 40 by default; the tiny preset gives stage 1 10 steps, 2a and 2b 10 each, 3 20):
    R1       cold GRPO: stage 3 on all labels for S steps
    T3-raw   raw teacher, bridge only, all labels: 2a and 2b for S/2 steps each
    R3-full  stage 1 on all labels, then 2a and 2b for S/2 steps each; no stage 3
    R5-half  stage 1 on 1H, 2a and 2b on 1H, stage 3 on 2H (its stage_2b is the "after the bridge (1H)" row)
    R7       R5-half's bridge, stage 3 on 1H
    R2       R5-half's stage 1, teacher-sample SFT (2a with --fkl-loss sft) for S/2 steps, stage 3 on 2H
    R8       R5-half's stage 1, OPD alone (2b) for S/2 steps, stage 3 on 2H
Every route's student takes S optimizer steps; the routes with a stage 3 give it the preset's --steps-3 and the
transfer the rest.

Each stage's output is a deterministic function of (seed, its input models, its data): every stage seeds its data
order and rollouts by (seed, stage, step), never by its place in the run. So R7, R2 and R8 reuse R5-half's stage
outputs instead of recomputing them: `--stages 3 --stage3-data 1H --model R5/stage_2b` is exactly R7's command
`--stages 1,2a,2b,3 --stage3-data 1H`, `--stages 2a,3 --fkl-loss sft --teacher R5/stage_1` exactly R2's
`--stages 1,2a,3 --fkl-loss sft`, and `--stages 2b,3 --teacher R5/stage_1` exactly R8's `--stages 1,2b,3` (with
their step counts). Runs go to bench/out/sparse_to_dense/<route>-s<seed>/; the tables (markdown) and the raw
numbers (JSON) to bench/out/sparse_to_dense/ (--name: another folder). A study can run in chunks: --routes runs
a subset, --keep-done skips the runs an earlier call finished; the tables cover every route finished for all seeds
(--report: only the tables).
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
REUSES = {"R7": "R5-half", "R2": "R5-half", "R8": "R5-half"}  # route -> the route whose stage outputs it reads
# The paper's MATH-500 avg@16 (%) for each route with the RL'd Qwen3-8B teacher (Tables 3, 4, 6).
PAPER = {"R1": 75.9, "T3-raw": 71.5, "R3-full": 79.3, "R5-half": 78.5, "bridge 1H": 75.4, "R7": 75.7, "R2": 77.3,
         "R8": 77.8}
# The paper's orderings, as paired differences a − b (Table 3; Table 4; Section 5.4; Table 6) and their MATH gaps.
ORDERINGS = [("R3-full", "R1", "Table 3: RL'd-teacher transfer beats cold GRPO"),
             ("R1", "T3-raw", "Table 3: cold GRPO beats raw-teacher transfer"),
             ("R3-full", "T3-raw", "Table 3: stage 1 makes the teacher worth distilling"),
             ("R5-half", "bridge 1H", "Table 4: GRPO on 2H lifts the bridge"),
             ("R5-half", "R7", "Table 4: held-out labels beat replay"),
             ("R5-half", "R1", "Table 4: R5-half beats cold GRPO"),
             ("R3-full", "R5-half", "Section 5.4: 2H upstream beats 2H in stage 3"),
             ("R5-half", "R8", "Table 6: the warmup helps (bridge > OPD only)"),
             ("R5-half", "R2", "Table 6: on-policy transfer helps (bridge > teacher-sample SFT)"),
             ("R8", "R2", "Table 6: OPD only > teacher-sample SFT")]


def routes(a, dirs: dict[str, Path]) -> dict[str, list[str]]:
    """Route -> its flags (on top of the common ones); `dirs` holds R5-half's run directory of the same seed."""
    half = str(a.student_steps // 2)
    r5 = dirs.get("R5-half", Path("R5-half"))
    return {
        "R1": ["--stages", "3", "--stage3-data", "full", "--steps-3", str(a.student_steps),
               "--eval-every", str(a.student_steps)],  # also evaluates the student at the start
        "T3-raw": ["--stages", "2a,2b", "--upstream-data", "full", "--steps-2a", half, "--steps-2b", half],
        "R3-full": ["--stages", "1,2a,2b", "--upstream-data", "full", "--steps-2a", half, "--steps-2b", half,
                    "--eval-every", "100000"],  # also evaluates both models at the start
        "R5-half": ["--stages", "1,2a,2b,3", "--upstream-data", "1H", "--stage3-data", "2H", "--eval-every", "100000"],
        "R7": ["--stages", "3", "--stage3-data", "1H", "--model", str(r5 / "stage_2b")],
        "R2": ["--stages", "2a,3", "--fkl-loss", "sft", "--steps-2a", half, "--teacher", str(r5 / "stage_1")],
        "R8": ["--stages", "2b,3", "--steps-2b", half, "--teacher", str(r5 / "stage_1")],
    }


def accuracy(row: dict) -> float:
    """A benchmark's avg@n in an eval row (not its standard error, avg@n_se)."""
    return next(v for k, v in row.items() if k.startswith("avg@") and not k.endswith("_se"))


def mean_acc(res: dict) -> float:
    return statistics.mean(accuracy(r) for r in res.values())


def read_run(out: Path) -> dict:
    """Mean held-out accuracy after each stage of a finished run, and of the models it started from."""
    stages = {}
    for f in sorted(out.glob("stage_*.json")):
        s = json.loads(f.read_text())
        stages[s["stage"]] = mean_acc(s["eval"])
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines() if x.strip()]
    for key, tag in (("start", ""), ("teacher start", "teacher")):
        start = [accuracy(e) for e in evals if e["step"] == 0 and e.get("tag", "") == tag]
        if start:
            stages[key] = statistics.mean(start)
    cfg = json.loads((out / "config.json").read_text())["args"]
    return {"out": str(out), "stages": stages, "final": stages[cfg["stages"].split(",")[-1]]}


def run(name: str, seed: int, flags: list[str], common: list[str], root: Path) -> dict:
    out = root / f"{name}-s{seed}"
    cmd = [sys.executable, str(ROOT / "sparse_to_dense.py"), *common, *flags, "--seed", str(seed),
           "--output-dir", str(out), "--overwrite"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode:
        sys.exit(f"{name} seed {seed} failed:\n{p.stderr[-4000:]}")
    res = read_run(out) | {"wall_s": time.time() - t0}
    (out / "study_wall_s.txt").write_text(f"{res['wall_s']:.1f}\n")
    print(f"{name} seed {seed}: {res['stages']} ({res['wall_s']:.0f}s)", flush=True)
    return res


def fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def tables(results: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    """The route table (each stage's mean accuracy, final, wall time) and the paired differences of the orderings."""
    lines = ["| route | paper MATH (%) | teacher at start | teacher after 1 | student at start | after 2a | after 2b | "
             "final student | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    final = {n: {s: r["final"] for s, r in runs.items()} for n, runs in results.items()}
    if "R5-half" in results:
        final["bridge 1H"] = {s: r["stages"]["2b"] for s, r in results["R5-half"].items()}
    for n, runs in results.items():
        def col(stage):
            xs = [r["stages"][stage] for r in runs.values() if stage in r["stages"]]
            return fmt(xs) if xs else "-"
        wall = [r["wall_s"] for r in runs.values() if "wall_s" in r]
        lines.append(f"| {n} | {PAPER.get(n, '-')} | {col('teacher start')} | {col('1')} | {col('start')} | "
                     f"{col('2a')} | {col('2b')} | {fmt(list(final[n].values()))} | "
                     f"{statistics.mean(wall) if wall else 0:.0f} |")
    lines += ["", "| ordering (paper) | paper gap (MATH points) | toy a − b, per seed | mean ± std | holds |",
              "|---|---|---|---|---|"]
    for a, b, what in ORDERINGS:
        if a in final and b in final and all(s in final[a] and s in final[b] for s in seeds):
            d = [final[a][s] - final[b][s] for s in seeds]
            m = statistics.mean(d)
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            holds = "yes" if m > sd else "no (reversed)" if m < -sd else "within noise"
            lines.append(f"| {what}: {a} > {b} | {PAPER[a] - PAPER[b]:+.1f} | "
                         f"{', '.join(f'{x:+.3f}' for x in d)} | {m:+.3f} ± {sd:.3f} | {holds} |")
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (timings then include their contention)")
    ap.add_argument("--student-steps", type=int, default=40, help="every route's student-side optimizer steps")
    ap.add_argument("--routes", nargs="+", default=None, help="run only these routes (default: all)")
    ap.add_argument("--report", action="store_true", help="run nothing: tables from the finished run folders")
    ap.add_argument("--keep-done", action="store_true", help="skip the runs already finished by an earlier call of "
                                                             "the same study (a study run in chunks)")
    ap.add_argument("--name", default="sparse_to_dense", help="folder under bench/out")
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    # each run gets its share of the cores: more threads than cores made every process several times slower
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // a.jobs)))
    root = ROOT / "bench" / "out" / a.name
    root.mkdir(parents=True, exist_ok=True)
    names = list(routes(a, {}))
    todo = [] if a.report else (a.routes or names)

    def chain(name: str, seed: int) -> dict:
        """A route, after the route whose stage outputs it reads (run here if it has not finished yet)."""
        dirs = {}
        if name in REUSES:
            base = root / f"{REUSES[name]}-s{seed}"
            if not (base / "final").exists():
                sys.exit(f"{name} reads {REUSES[name]}'s stage outputs: run --routes {REUSES[name]} first")
            dirs[REUSES[name]] = base
        if a.keep_done and (root / f"{name}-s{seed}" / "study_wall_s.txt").exists():
            return {}
        return run(name, seed, routes(a, dirs)[name], common, root)

    first = [n for n in todo if n not in REUSES]
    with ThreadPoolExecutor(a.jobs) as pool:
        for batch in (first, [n for n in todo if n in REUSES]):
            for f in [pool.submit(chain, n, s) for n in batch for s in a.seeds]:
                f.result()

    results = {}
    for n in names:
        runs = {s: root / f"{n}-s{s}" for s in a.seeds}
        if all((p / "final").exists() for p in runs.values()):
            results[n] = {}
            for s, p in runs.items():
                wall = p / "study_wall_s.txt"
                results[n][s] = read_run(p) | ({"wall_s": float(wall.read_text())} if wall.exists() else {})
    table = tables(results, a.seeds)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    (root / "table.md").write_text(f"`{' '.join(sys.argv)}`, seeds {a.seeds}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
