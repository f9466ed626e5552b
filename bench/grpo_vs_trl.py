"""A GRPO step of ours (kdrl.py --kd-coef 0 --teacher none) against TRL's GRPOTrainer on the same model, batch and
lengths, on the CPU toy world, both in one run; reports the median step time of each and their ratio.

    pip install trl==1.16.0 && python bench/grpo_vs_trl.py [--steps 12]

Matched: tiny:small, 16 prompts x 8 completions, at most 48 new tokens, T = 1, one forward/backward of all 128
sequences per step, token-mean loss, no KL term, lr 1e-4, the same math-verify accuracy reward, no gradient
checkpointing, fp32, 2 CPU threads. The first 2 steps of each are warm-up and are not counted.
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
P, G, MAX_NEW, LR, WARMUP = 16, 8, 48, 1e-4, 2


def run_trl(steps: int, out: Path) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer


    import verifiers
    import tiny

    path = tiny.warm_start("small")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    rows = tiny.make_split("add,mul,lin", "train", 512, 0)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["problem"]}], "answer": r["answer"]} for r in rows])
    grader = verifiers.Grader(workers=1)

    def accuracy(completions, answer, **kw):
        return grader([c[0]["content"] for c in completions], list(answer))

    times, t0 = [], [0.0]

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            t0[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - t0[0])

    cfg = GRPOConfig(output_dir=str(out), use_vllm=False, use_cpu=True, bf16=False, per_device_train_batch_size=P * G,
                     num_generations=G, max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0,
                     learning_rate=LR, beta=0.0, loss_type="dapo", scale_rewards="group", max_steps=steps,
                     logging_steps=1, save_strategy="no", report_to="none", seed=0, gradient_checkpointing=False,
                     dataloader_num_workers=0, lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0)
    GRPOTrainer(model=model, reward_funcs=[accuracy], args=cfg, train_dataset=ds, processing_class=tok,
                callbacks=[Clock()]).train()
    grader.close()
    return times


def run_ours(steps: int, out: Path) -> list[float]:
    cmd = [sys.executable, str(ROOT / "kdrl.py"), "--preset", "tiny", "--kd-coef", "0", "--teacher", "none",
           "--total-steps", str(steps), "--eval-every", "0", "--save-every", "0", "--eval-limit", "8",
           "--micro-batch-size", str(P * G), "--output-dir", str(out), "--overwrite"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", choices=["trl"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = ROOT / "bench" / "out" / "grpo_vs_trl"
    if a.only == "trl":  # child process: TRL in a clean interpreter, step times as JSON on the last line
        print(json.dumps(run_trl(a.steps, out / "trl")))
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    rows = run_ours(a.steps, out / "ours")[WARMUP:]
    ours = [r["timing_s/step"] for r in rows]
    p = subprocess.run([sys.executable, __file__, "--only", "trl", "--steps", str(a.steps)], capture_output=True,
                       text=True, check=True, cwd=ROOT)
    trl = json.loads(p.stdout.strip().splitlines()[-1])[WARMUP:]
    mo, mt = statistics.median(ours), statistics.median(trl)
    table = (f"| implementation | median step (s) | steps timed |\n|---|---|---|\n"
             f"| tandem kdrl.py (GRPO) | {mo:.3f} | {len(ours)} |\n| TRL GRPOTrainer | {mt:.3f} | {len(trl)} |\n\n"
             f"TRL / tandem = {mt / mo:.2f}x\n\nwhere tandem's step goes (median s): " +
             ", ".join(f"{k} {statistics.median(r[f'timing_s/{k}'] for r in rows):.3f}"
                       for k in ("rollout", "reward", "update", "sync")))
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
