"""The CoPD toy study: CoPD against mixed RLVR, the two experts (and their plain merge), static OPD in both
directions and MOPD, at matched total steps, over seeds, scored on both task families; with the branch-overlap curves.

    python bench/copd_study.py --seeds 0 1 2 --jobs 2            # the tiny preset (tiny:habits on add and lin)
    python bench/copd_study.py --seeds 0 1 2 --jobs 2 --name copd_formats -- \
        --model tiny:formats --verifiers math math_tag --eval-verifiers math math_tag    # the interference world
    python bench/copd_study.py --seeds 0 1 2 --jobs 2 --name copd_cue_dot -- --model tiny:cue_dot \
        --train-data tiny:add tiny:add_dot --eval-data tiny_add,tiny_add_dot \
        --verifiers math math_tag --eval-verifiers math math_tag       # one task behind a cue (also tiny:cue_think)
    python bench/copd_study.py ... --configs copd mixed               # a subset of the runs (here the headline pair)

Every run is `copd.py --preset tiny --mode ... <flags after -->` (T = 40 steps per branch; copd.py's defaults: Eq.
rlvr's sequence mean of token means, mixed RLVR from one pool of both datasets); runs go to
bench/out/<name>/<config>-s<seed>/ and a finished run is reused. The table (markdown, mean ± std over seeds of held-out
avg@4 at T = 1, 128 problems per family, and CoPD's merged model minus each row, paired by seed) goes to
bench/out/<name>/table.md, the raw numbers to results.json, and the figure (top-10 overlap and symmetric KL between
the two branches over training, mean ± std) to bench/copd_overlap.png (bench/<name>_overlap.png for another --name).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> flags; T per branch is the tiny preset's 40 steps
    "copd": [],
    "experts": ["--mode", "experts"],
    "mixed": ["--mode", "mixed"],
    "static_add_to_lin": ["--mode", "static_opd", "--static-student", "1"],
    "static_lin_to_add": ["--mode", "static_opd", "--static-student", "0"],
    "mopd": ["--mode", "mopd"],
}
ROWS = [  # (label, config, tag of the evaluated model, whether it is the step-0 base)
    ("base π_0 (`{model}`)", "copd", "", True),
    ("expert `{fa}` (GRPO on {fa})", "experts", "branch0", False),
    ("expert `{fb}` (GRPO on {fb})", "experts", "branch1", False),
    ("experts, merged (uniform average)", "experts", "", False),
    ("mixed RLVR (one model, {fa} ∪ {fb})", "mixed", "", False),
    ("static OPD {fa} → {fb} (student: {fb} expert)", "static_add_to_lin", "", False),
    ("static OPD {fb} → {fa} (student: {fa} expert)", "static_lin_to_add", "", False),
    ("MOPD (π_0 learns from both frozen experts)", "mopd", "", False),
    ("CoPD branch `{fa}`, unmerged", "copd", "branch0", False),
    ("CoPD branch `{fb}`, unmerged", "copd", "branch1", False),
    ("**CoPD, merged**", "copd", "", False),
]


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_all(study: Path, seeds: list[int], jobs: int, extra: list[str], configs: list[str]) -> None:
    todo = [(c, s) for c in configs for s in seeds if not (study / f"{c}-s{s}" / "final" / "config.json").exists()]
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    while todo or running:
        while todo and len(running) < jobs:
            c, s = todo.pop(0)
            out = study / f"{c}-s{s}"
            cmd = [sys.executable, str(ROOT / "copd.py"), "--preset", "tiny", "--save-every", "0", *CONFIGS[c], *extra,
                   "--seed", str(s), "--output-dir", str(out), "--overwrite"]
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "stdout.txt", "w")
            running.append((c, s, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env),
                            time.time()))
        time.sleep(5)
        for item in list(running):
            c, s, p, t0 = item
            if p.poll() is not None:
                running.remove(item)
                if p.returncode:
                    sys.exit(f"{c} seed {s} failed; see {study / f'{c}-s{s}' / 'stdout.txt'}")
                print(f"{c} seed {s}: done in {time.time() - t0:.0f}s", flush=True)


def families(cfg: dict) -> tuple[str, str]:
    """The two task families of a run's config, e.g. add and lin (tiny:add, tiny:lin)."""
    fa, fb = (x.split(":")[-1] for x in cfg["train_data"])
    return fa, fb


def fmt(xs: list[float], sign: bool = False) -> str:
    m = f"{statistics.mean(xs):+.3f}" if sign else f"{statistics.mean(xs):.3f}"
    return f"{m} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else m


def accuracy(run: Path, tag: str, base: bool) -> dict:
    evals = [e for e in read(run / "eval.jsonl") if e.get("tag", "") == tag]
    step = 0 if base else max(e["step"] for e in evals)
    return {e["benchmark"]: e["avg@4"] for e in evals if e["step"] == step}


def table(study: Path, seeds: list[int], configs: list[str]) -> tuple[str, dict]:
    benches = sorted(accuracy(study / f"copd-s{seeds[0]}", "", False))
    lines = [f"| model | optimizer steps | {' | '.join(benches)} | mean of all | CoPD merged minus this (paired) |",
             "|" + "---|" * (4 + len(benches))]
    raw = {}

    def mean_all(a: dict) -> float:
        return sum(a[b] for b in benches) / len(benches)

    copd_mean = [mean_all(accuracy(study / f"copd-s{s}", "", False)) for s in seeds]
    for label, c, tag, base in (r for r in ROWS if r[1] in configs):
        accs = [accuracy(study / f"{c}-s{s}", tag, base) for s in seeds]
        cfg = json.loads((study / f"{c}-s{seeds[0]}" / "config.json").read_text())["args"]
        T = cfg["total_steps"]
        steps = {"copd": f"2 × {T}", "experts": f"{T}" if tag else f"2 × {T}", "mixed": f"{2 * T}",
                 "mopd": f"2 × {T} + {T}"}.get(c, f"2 × {T} + {round(T * cfg['s_opd'] / (cfg['s_rl'] + cfg['s_opd']))}")
        fa, fb = families(cfg)
        label = label.format(model=cfg["model"], fa=fa, fb=fb)
        raw[label] = accs
        cells = [fmt([a[b] for a in accs]) for b in benches]
        paired = "-" if (c, tag, base) == ("copd", "", False) else fmt([x - mean_all(a) for x, a in zip(copd_mean, accs)], sign=True)
        lines.append(f"| {label} | {'0' if base else steps} | " + " | ".join(cells) +
                     f" | {fmt([mean_all(a) for a in accs])} | {paired} |")
    return "\n".join(lines), raw


def overlap_figure(study: Path, seeds: list[int], path: Path) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fa, fb = families(json.loads((study / f"copd-s{seeds[0]}" / "config.json").read_text())["args"])
    curves = {"copd": "CoPD", "experts": "experts (no OPD)",
              "static_add_to_lin": f"static OPD {fa} → {fb}, after the experts"}
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 2.9))
    final = {}
    for c, label in curves.items():
        for ax, key in zip(axes, ("diag/overlap_top10", "diag/sym_kl")):
            first = 0 if c != "static_add_to_lin" else json.loads(  # its first T steps are the experts run
                (study / f"{c}-s{seeds[0]}" / "config.json").read_text())["args"]["total_steps"]
            runs = [[(r["step"], r[key]) for r in read(study / f"{c}-s{s}" / "metrics.jsonl")
                     if key in r and r["step"] >= first] for s in seeds]
            steps = [x for x, _ in runs[0]]
            ys = [[y for _, y in run] for run in runs]
            mean = [statistics.mean(v) for v in zip(*ys)]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*ys)]
            start = [(0, 1.0 if "overlap" in key else 0.0)] if first == 0 else []  # the branches start equal
            ax.plot([x for x, _ in start] + steps, [y for _, y in start] + mean, marker=".", lw=1.2, label=label)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
            final[f"{c}:{key}"] = [y[-1] for y in ys]
    cfg = json.loads((study / f"copd-s{seeds[0]}" / "config.json").read_text())["args"]
    cycle = cfg["s_rl"] + cfg["s_opd"]
    for ax, title in zip(axes, ("top-10 overlap O_10 between the branches", "symmetric KL between the branches")):
        for start in range(cfg["s_rl"], cfg["total_steps"], cycle):  # CoPD's Phase II (mutual OPD) windows
            ax.axvspan(start, start + cfg["s_opd"], color="0.9", lw=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step (per branch; shaded: CoPD Phase II)", fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return final


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=3, help="runs at once (each uses one thread)")
    ap.add_argument("--name", default="copd_study")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                    help="a subset of the runs (the figure needs copd, experts and static_add_to_lin)")
    ap.add_argument("extra", nargs="*", help="flags added to every run (after --)")
    a = ap.parse_args()
    study = ROOT / "bench" / "out" / a.name
    t0 = time.time()
    run_all(study, a.seeds, a.jobs, a.extra, a.configs)
    md, raw = table(study, a.seeds, a.configs)
    figure = ROOT / "bench" / ("copd_overlap.png" if a.name == "copd_study" else f"{a.name}_overlap.png")
    final = overlap_figure(study, a.seeds, figure) if {"copd", "experts", "static_add_to_lin"} <= set(a.configs) else {}
    diag = "\n".join(f"- {k}: {fmt(v)}" for k, v in final.items())
    name = ("" if a.name == "copd_study" else f" --name {a.name}") + \
        ("" if a.configs == list(CONFIGS) else f" --configs {' '.join(a.configs)}")
    text = (f"`python bench/copd_study.py --seeds {' '.join(map(str, a.seeds))}{name}`"
            f"{' -- ' + ' '.join(a.extra) if a.extra else ''}, {time.time() - t0:.0f}s\n\n{md}\n\n"
            f"Branch divergence at the end of training (mean ± std over seeds):\n{diag}\n")
    (study / "table.md").write_text(text)
    (study / "results.json").write_text(json.dumps({"accuracy": raw, "final_divergence": final}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
