"""CoPD's pilot study (arXiv 2604.27083, §2.3 and Figure 2), the paper's own evidence for its mechanism, in the toy
world: does on-policy distillation from a fixed teacher help a student more when the two overlap more (Experiment 1),
and does independent RLVR drive each expert's overlap with the base down (Experiment 2)?

    python bench/copd_pilot.py --seeds 0 1 2 --jobs 2

Every run is `copd.py --preset tiny` (base tiny:habits, families add and lin, T = 40 steps, lr 1e-4) with its
defaults, at one seed per set of runs, into bench/out/copd_pilot/ (a finished run is reused):
  experts   --mode mopd --static-opd-steps 1 --s-rl 4 --s-opd 4: the two experts, 40 GRPO steps each from π_0. MOPD's
            student is still π_0 over those steps, so the run's diagnostics every 4 steps (S_RL, S_OPD only set that
            interval here) are each expert's O_10 and symmetric KL to π_0: Experiment 2 (one MOPD step follows, unused).
            The add expert (branches/branch0) is Experiment 1's fixed teacher.
  students  --mode experts --total-steps S --temperature τ for each τ in --temps: the base trained for a short
            period at different sampling temperatures, as the paper builds its students; the run's add branch
            (GRPO on the teacher's data) and its lin branch (GRPO on the other family) are two series of students.
  OPD       --mode static_opd --total-steps 0 --static-teacher <add expert> --model <student> --static-student 0
            --train-data tiny:lin tiny:add --static-opd-steps T_OPD: pure OPD on the teacher's data with one
            configuration and budget for every student. The run evaluates the student before (step 0) and after,
            with the same evaluation seed; the gain is the difference on the teacher's family (tiny_add, avg@4 at T 1,
            128 held-out problems).
Before and after OPD, O_10 and symmetric KL between each student and the teacher are measured as Eq. (overlap) defines
O_k, on the student's own samples (one per prompt, T 1) of the first --diag-prompts add training prompts, with
copd.overlap_and_sym_kl, copd.py's own diagnostic. Experiment 2 uses copd.py's logged diagnostic, which pools the
samples of both models on the prompts of both families.

Writes bench/out/copd_pilot/table.md (every student; Pearson r of gain against O_10 per seed and pooled) and
results.json, and the figure bench/copd_pilot.png.
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
sys.path.insert(0, str(ROOT))
STUDY = ROOT / "bench" / "out" / "copd_pilot"
SERIES = {"add": "branch0", "lin": "branch1"}  # the students' training family -> their branch in the students run


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_all(runs: list[tuple[str, list[str]]], jobs: int) -> None:
    """Each (name, copd.py flags) into STUDY/name, `jobs` at a time, one thread each; finished runs are kept."""
    todo = [(n, f) for n, f in runs if not (STUDY / n / "final" / "config.json").exists()]
    running = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    while todo or running:
        while todo and len(running) < jobs:
            name, flags = todo.pop(0)
            out = STUDY / name
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(ROOT / "copd.py"), "--preset", "tiny", "--save-every", "0", *flags,
                   "--output-dir", str(out), "--overwrite"]
            running.append((name, subprocess.Popen(cmd, cwd=ROOT, stdout=open(out / "stdout.txt", "w"),
                                                   stderr=subprocess.STDOUT, env=env), time.time()))
        time.sleep(3)
        for item in list(running):
            name, p, t0 = item
            if p.poll() is not None:
                running.remove(item)
                if p.returncode:
                    sys.exit(f"{name} failed; see {STUDY / name / 'stdout.txt'}")
                print(f"{name}: done in {time.time() - t0:.0f}s", flush=True)


def accuracy(run: Path, step: int, bench: str = "tiny_add") -> float:
    return next(e["avg@4"] for e in read(run / "eval.jsonl")
                if e["step"] == step and not e.get("tag") and e["benchmark"] == bench)


def overlap_to_teacher(student_path: Path, teacher_path: Path, seed: int, n_prompts: int) -> tuple[float, float]:
    """O_10 and symmetric KL (means over response tokens) between student and teacher on the student's own samples
    of the first n add training prompts: Eq. (overlap)'s μ_θ, the student's state distribution."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import common
    import copd
    import engines
    import runtime
    transformers.utils.logging.disable_progress_bar()
    tok = runtime.load_tokenizer(str(student_path))
    vocab = len(tok)
    student, teacher = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (student_path, teacher_path))
    engine = engines.HFEngine(student, runtime.eos_ids(tok, str(student_path)), tok.pad_token_id, vocab, 256)
    rows = common.load_problems("tiny:add", "train", seed=seed)[:n_prompts]
    ro = engines.rollout(engine, tok, rows, 1, "{problem}", 64, engines.Sampling(48, 1.0, 1.0, 0), seed=1000 + seed)
    o_sum = kl_sum = n = 0.0
    with torch.no_grad():
        for _, mb in ro.batch(tok.pad_token_id, "cpu").micro_batches(64):
            o_N, kl_N = copd.overlap_and_sym_kl(common.response_hidden(student, mb), student.get_output_embeddings(),
                                                common.response_hidden(teacher, mb), teacher.get_output_embeddings(),
                                                vocab, 10, 4096)
            o_sum, kl_sum, n = o_sum + float(o_N.sum()), kl_sum + float(kl_N.sum()), n + o_N.numel()
    return o_sum / n, kl_sum / n


def pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx_syy = sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys)
    return sxy / sxx_syy ** 0.5 if sxx_syy > 0 else float("nan")


def fmt(xs: list[float], digits: int = 3, sign: str = "") -> str:
    m = f"{statistics.mean(xs):{sign}.{digits}f}"
    return f"{m} ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else m


def exp2_curves(seeds: list[int], T: int) -> dict:
    """{(expert, key): (steps, values per seed)}: each expert's logged O_10 and symmetric KL to π_0 (model 2, MOPD's
    untrained student) over its T GRPO steps, with step 0 (identical models: O_10 = 1, KL = 0)."""
    curves = {}
    for k, fam in enumerate(SERIES):
        for key in ("overlap_top10", "sym_kl"):
            per_seed = []
            for s in seeds:
                pts = [(r["step"], r[f"diag/{key}/2-{k}"]) for r in read(STUDY / f"experts-s{s}" / "metrics.jsonl")
                       if f"diag/{key}/2-{k}" in r and r["step"] <= T]
                per_seed.append([1.0 if key == "overlap_top10" else 0.0] + [v for _, v in pts])
            curves[(fam, key)] = ([0] + [st for st, _ in pts], per_seed)
    return curves


def figure(students: list[dict], curves: dict, seeds: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.4))
    colors, markers = {"add": "tab:blue", "lin": "tab:orange"}, ["o", "s", "^", "D", "v"]
    for fam in SERIES:
        pts = [r for r in students if r["series"] == fam]
        for i, s in enumerate(seeds):
            mine = [r for r in pts if r["seed"] == s]
            axes[0].scatter([r["o10_before"] for r in mine], [r["gain"] for r in mine], c=colors[fam],
                            marker=markers[i % len(markers)], s=22, label=f"students on {fam}, seed {s}")
        xs, ys = [r["o10_before"] for r in pts], [r["gain"] for r in pts]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
        axes[0].plot([min(xs), max(xs)], [my + slope * (min(xs) - mx), my + slope * (max(xs) - mx)], c=colors[fam],
                     lw=1, label=f"fit, students on {fam}: pooled r = {pearson(xs, ys):+.2f}")
    axes[0].axhline(0, c="0.6", lw=0.6)
    axes[0].set_xlabel("O_10 (student, teacher) before OPD", fontsize=8)
    axes[0].set_ylabel("gain on add from OPD (avg@4)", fontsize=8)
    axes[0].set_title("Exp. 1: OPD gain against overlap", fontsize=9)
    axes[0].legend(fontsize=5.5)
    for ax, key, title in ((axes[1], "overlap_top10", "Exp. 2: O_10 of each expert to π_0"),
                           (axes[2], "sym_kl", "Exp. 2: symmetric KL of each expert to π_0")):
        for fam in SERIES:
            steps, ys = curves[(fam, key)]
            if key == "sym_kl":  # a log axis from the first measurement (π_0 against itself is 0)
                steps, ys = steps[1:], [y[1:] for y in ys]
            mean = [statistics.mean(v) for v in zip(*ys)]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*ys)]
            ax.plot(steps, mean, marker=".", c=colors[fam], lw=1.2, label=f"{fam} expert (GRPO on {fam})")
            ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=colors[fam], alpha=0.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("GRPO step", fontsize=8)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    ap.add_argument("--temps", type=float, nargs="+", default=[0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0],
                    help="the students' sampling temperatures")
    ap.add_argument("--expert-steps", type=int, default=40, help="T of the experts (the tiny preset's 40)")
    ap.add_argument("--student-steps", type=int, default=10, help="S: the students' short GRPO training")
    ap.add_argument("--opd-steps", type=int, default=16, help="T_opd of every student (the tiny static_opd budget)")
    ap.add_argument("--diag-prompts", type=int, default=64, help="add prompts of the overlap measurement")
    ap.add_argument("--name", default="copd_pilot", help="bench/out/<name>; the figure is bench/<name>.png")
    a = ap.parse_args()
    global STUDY
    STUDY = ROOT / "bench" / "out" / a.name
    t0 = time.time()
    T = a.expert_steps
    first = [(f"experts-s{s}", ["--mode", "mopd", "--total-steps", str(T), "--static-opd-steps", "1", "--s-rl", "4",
                                "--s-opd", "4", "--seed", str(s)]) for s in a.seeds]
    first += [(f"students-t{t}-s{s}", ["--mode", "experts", "--total-steps", str(a.student_steps), "--temperature",
                                       str(t), "--eval-limit", "16", "--diag-prompts", "0", "--seed", str(s)])
              for s in a.seeds for t in a.temps]  # the OPD runs evaluate the students in full
    run_all(first, a.jobs)
    opd = [(f"opd-{fam}-t{t}-s{s}", ["--mode", "static_opd", "--total-steps", "0", "--static-opd-steps",
                                     str(a.opd_steps), "--static-student", "0", "--train-data", "tiny:lin", "tiny:add",
                                     "--static-teacher", str(STUDY / f"experts-s{s}" / "branches" / "branch0"),
                                     "--model", str(STUDY / f"students-t{t}-s{s}" / "branches" / branch),
                                     "--seed", str(s)])
           for s in a.seeds for t in a.temps for fam, branch in SERIES.items()]
    run_all(opd, a.jobs)

    students = []
    for s in a.seeds:
        teacher = STUDY / f"experts-s{s}" / "branches" / "branch0"
        for t in a.temps:
            for fam, branch in SERIES.items():
                run = STUDY / f"opd-{fam}-t{t}-s{s}"
                cache = run / f"overlap{a.diag_prompts}.json"  # the measurement, kept with its run
                if not cache.exists():
                    student = STUDY / f"students-t{t}-s{s}" / "branches" / branch
                    cache.write_text(json.dumps([overlap_to_teacher(m, teacher, s, a.diag_prompts)
                                                 for m in (student, run / "final")]))
                (o_b, kl_b), (o_a, kl_a) = json.loads(cache.read_text())
                before, after = accuracy(run, 0), accuracy(run, a.opd_steps)
                students.append(dict(series=fam, temp=t, seed=s, o10_before=o_b, kl_before=kl_b, o10_after=o_a,
                                     kl_after=kl_a, add_before=before, add_after=after, gain=after - before,
                                     lin_before=accuracy(run, 0, "tiny_lin"),
                                     lin_after=accuracy(run, a.opd_steps, "tiny_lin")))
    teacher_add = [next(e["avg@4"] for e in read(STUDY / f"experts-s{s}" / "eval.jsonl") if e.get("tag") == "branch0"
                        and e["benchmark"] == "tiny_add") for s in a.seeds]
    curves = exp2_curves(a.seeds, T)
    figure(students, curves, a.seeds, ROOT / "bench" / f"{a.name}.png")

    name = "" if a.name == "copd_pilot" else f" --name {a.name}"
    lines = [f"`python bench/copd_pilot.py{name} --seeds {' '.join(map(str, a.seeds))} --temps "
             f"{' '.join(map(str, a.temps))} --expert-steps {T} --student-steps {a.student_steps} "
             f"--opd-steps {a.opd_steps}`, "
             f"{time.time() - t0:.0f}s (reusing finished runs)", "",
             f"Teacher (add expert, {T} GRPO steps) on tiny_add: {fmt(teacher_add)} (mean ± std over seeds).", "",
             "Experiment 1, Pearson r of the OPD gain on add against O_10 before OPD:", ""]
    summary = {}
    for fam in SERIES:
        pts = [r for r in students if r["series"] == fam]
        per_seed = [pearson(*zip(*[(r["o10_before"], r["gain"]) for r in pts if r["seed"] == s])) for s in a.seeds]
        pooled = pearson([r["o10_before"] for r in pts], [r["gain"] for r in pts])
        kl_r = pearson([r["kl_before"] for r in pts], [r["gain"] for r in pts])
        acc_r = pearson([r["add_before"] for r in pts], [r["gain"] for r in pts])
        summary[fam] = dict(r_per_seed=per_seed, r_pooled=pooled, r_kl_pooled=kl_r, r_add_before_pooled=acc_r)
        lines.append(f"- students trained on {fam}: r per seed {', '.join(f'{x:+.2f}' for x in per_seed)} "
                     f"(mean {fmt(per_seed, 2, '+')}); pooled over seeds {pooled:+.2f} ({len(pts)} students); "
                     f"pooled r of the gain against symmetric KL before OPD {kl_r:+.2f}, against the student's add "
                     f"accuracy before OPD {acc_r:+.2f}")
    lines += ["", "| students on | τ | O_10 before | sym KL before | add before | add after | gain | O_10 after | "
                  "lin before → after |", "|---|---|---|---|---|---|---|---|---|"]
    for fam in SERIES:
        for t in a.temps:
            rs = [r for r in students if r["series"] == fam and r["temp"] == t]
            col = {k: [r[k] for r in rs] for k in rs[0] if k not in ("series", "temp", "seed")}
            lines.append(f"| {fam} | {t} | {fmt(col['o10_before'])} | {fmt(col['kl_before'])} | "
                         f"{fmt(col['add_before'])} | {fmt(col['add_after'])} | {fmt(col['gain'], sign='+')} | "
                         f"{fmt(col['o10_after'])} | {fmt(col['lin_before'])} → {fmt(col['lin_after'])} |")
    lines += ["", "Experiment 2 (each expert against π_0; mean ± std over seeds):", ""]
    for fam in SERIES:
        for key in ("overlap_top10", "sym_kl"):
            steps, ys = curves[(fam, key)]
            seq = [statistics.mean(v) for v in zip(*ys)]
            mono = sum((c > b) == (key == "sym_kl") and c != b for b, c in zip(seq, seq[1:]))
            lines.append(f"- {fam} expert, {key}: " + ", ".join(f"{st}: {m:.4f}" for st, m in zip(steps, seq)) +
                         f"; at step {steps[-1]}: {fmt([y[-1] for y in ys], 4)}; "
                         f"{'falls' if key != 'sym_kl' else 'rises'} in {mono} of {len(seq) - 1} intervals")
    text = "\n".join(lines) + "\n"
    (STUDY / "table.md").write_text(text)
    (STUDY / "results.json").write_text(json.dumps(
        {"students": students, "summary": summary, "teacher_add": teacher_add,
         "exp2": {f"{f}:{k}": v for (f, k), v in curves.items()}}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
