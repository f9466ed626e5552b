"""Where a GRPO step's time goes: kdrl.py --kd-coef 0 --teacher none (the run bench/grpo_vs_trl.py times) under
cProfile, summarised as the share of the training steps spent in each part of the step.

    python bench/profile_step.py [--steps 12] [-- extra kdrl.py flags]

The profiler runs from the first step after --warmup to the end of the train loop (start-up, model loading and the
final evaluation are outside it); each part is the cumulative time of the functions that implement it. Parts nest
(indented lines run inside the one above; FSDP's collectives run inside forward and backward).
"""

import argparse
import cProfile
import os
import pstats
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# part -> (file suffix, function name) whose cumulative time is that part; indented lines are inside the one above
PARTS = [
    ("rollout (HF sampler)", "engines.py", "generate"),
    ("reward (math-verify workers)", "verifiers.py", "__call__"),
    ("update: micro-batch forward", "common.py", "response_hidden"),
    ("update: LM head + log-softmax (chunked)", "common.py", "logprobs_from_hidden"),
    ("update: backward", "_tensor.py", "backward"),
    ("update: clip + AdamW step", "runtime.py", "optimizer_step"),
    ("  AdamW", "adam.py", "step"),
    ("  gradient clipping", "clip_grad.py", "clip_grad_norm_"),
    ("FSDP2 all-gather (forward and backward)", "_fsdp_collectives.py", "foreach_all_gather"),
    ("FSDP2 reduce-scatter (gradients)", "_fsdp_collectives.py", "foreach_reduce"),
    ("weight push to the sampler", "engines.py", "sync_weights"),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Cumulative seconds of every function `name` defined in a file ending in `suffix`, counted once per call chain
    (recursive calls included once, as cProfile's cumulative time does)."""
    return sum(v[3] for (f, _, fn), v in stats.stats.items() if fn == name and f.endswith(suffix))


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps run before the profiler starts")
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = ROOT / "bench" / "out" / "profile_step"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import runtime

    prof, clock = cProfile.Profile(), {}
    set_lr, save_hf = runtime.set_lr, runtime.save_hf

    def profiled_set_lr(opt, step, *args):  # called first thing in every step: start at step `warmup`
        if step == a.warmup:
            clock["t0"] = time.perf_counter()
            prof.enable()
        return set_lr(opt, step, *args)

    def stop_then_save_hf(*args, **kwargs):  # called right after the train loop
        prof.disable()
        clock["t1"] = time.perf_counter()
        return save_hf(*args, **kwargs)

    runtime.set_lr, runtime.save_hf = profiled_set_lr, stop_then_save_hf
    sys.argv = ["kdrl.py", "--preset", "tiny", "--kd-coef", "0", "--teacher", "none", "--total-steps", str(a.steps),
                "--eval-every", "0", "--save-every", "0", "--eval-limit", "8", "--micro-batch-size", "128",
                "--output-dir", str(out / "run"), "--overwrite", *extra]
    runpy.run_path(str(ROOT / "kdrl.py"), run_name="__main__")
    stats, n = pstats.Stats(prof), a.steps - a.warmup
    total = clock["t1"] - clock["t0"]
    lines = [f"kdrl.py GRPO (--kd-coef 0 --teacher none), tiny preset, steps {a.warmup + 1}-{a.steps} profiled: "
             f"{total / n:.3f} s per step under cProfile (which slows Python-heavy parts most)", "",
             "| part | s per step | share of the step |", "|---|---|---|"]
    for label, suffix, name in PARTS:
        t = cumulative(stats, suffix, name) / n
        lines.append(f"| {label.replace('  ', '&nbsp;&nbsp;')} | {t:.3f} | {t * n / total:.0%} |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    stats.dump_stats(str(out / "profile.pstats"))
    print(table)


if __name__ == "__main__":
    main()
