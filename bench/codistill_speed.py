"""The large model's step time in CoDistill-GRPO (on the small model's rollouts) against standard GRPO (on its own
rollouts), timed in one process under the same load: the comparison behind the paper's "about 18% faster".

    python bench/codistill_speed.py --seeds 0 1 2 --steps 20 -- --preset tiny

For each seed, one process trains the small model with CoDistill-GRPO together with two copies of the large model,
built and updated with codistill_grpo.py's own functions: copy A learns from the small model's rollouts as in
the script (it scores them, takes its importance weights, updates), copy B runs standard GRPO (it receives its new
weights in its rollout engine, samples its own G completions per prompt, is graded, updates on-policy). A and B
swap which goes first every step, so a busy machine slows both alike. The first step of each seed is a warm-up and
is not counted. At the end both copies are evaluated on the script's --eval-data (mean avg@n over benchmarks), next
to the warm start: the paper's other large-model claim, CoDistill "nearly matches" standard GRPO.
Results: bench/out/codistill_speed/{table.md,results.json}.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import codistill_grpo as cd  # noqa: E402
import cli  # noqa: E402
import common  # noqa: E402
import engines  # noqa: E402
import runtime  # noqa: E402
import verifiers  # noqa: E402


def run_seed(args: cd.Args, d, steps: int) -> dict[str, list[float]]:
    runtime.seed_everything(args.seed)
    small_path, large_path = runtime.resolve(args.model, d), runtime.resolve(args.large_model, d)
    tok = runtime.load_tokenizer(small_path)
    vocab, G, pad = len(tok), args.group_size, tok.pad_token_id
    small = runtime.load_model(small_path, d, trainable=True, vocab=vocab)
    large_A = runtime.load_model(large_path, d, trainable=True, vocab=vocab)
    large_B = runtime.load_model(large_path, d, trainable=True, vocab=vocab)
    engine = engines.make_engine("hf", small_path, d, tok, vocab, args)
    engine_B = engines.make_engine("hf", large_path, d, tok, vocab, args)
    opt = torch.optim.AdamW(small.parameters(), lr=args.lr)
    opt_A, opt_B = (torch.optim.AdamW(m.parameters(), lr=args.large_lr) for m in (large_A, large_B))
    grader = verifiers.Grader(args.grader_workers, args.grader_timeout, args.answer_format)
    rows = common.load_problems(args.train_data, args.train_split, args.problem_key, args.answer_key, seed=args.seed)
    stream = common.PromptStream(rows, args.prompts_per_step, d.rank, d.world, args.seed)
    sampling = engines.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    engines.sync_weights(small, engine)
    times = {"small_rollout": [], "A_large_step": [], "B_large_step": [], "B_rollout": [], "A_tokens": [],
             "B_tokens": []}

    def rollout(eng, problems, step, salt):
        return engines.rollout(eng, tok, problems, G, args.prompt_template, args.max_prompt_tokens, sampling,
                               runtime.rollout_seed(args.seed, step, d.rank, salt), args.chat_template)

    for step in range(steps):
        problems = stream.next()
        t0 = time.perf_counter()
        ro = rollout(engine, problems, step, 0)
        t_small = time.perf_counter() - t0
        acc_B, fmt_B = cd.task_rewards(grader, ro, args)
        batch = ro.batch(pad, d.device)
        logp_S_BT = cd.score(small, batch, vocab, args)  # the small model needs it for its own KD reward anyway
        adv_L_BT = common.group_advantages((acc_B + fmt_B).view(-1, G), args.adv_scale).view(-1, 1) * batch.mask_BT
        out = {}

        def phase_A():  # CoDistill: the large model scores the small model's rollouts and updates on them
            t0 = time.perf_counter()
            logp_L_BT = cd.score(large_A, batch, vocab, args)
            w_BT, _ = cd.large_is_weights(logp_L_BT, logp_S_BT, batch.mask_BT, torch.ones(batch.ids_BT.shape[0]),
                                          G, args)
            cd.ppo_update(large_A, opt_A, batch, adv_L_BT, logp_L_BT, w_BT, args.large_lr, vocab, args)
            out["A"], out["logp_L"] = time.perf_counter() - t0, logp_L_BT

        def phase_B():  # standard GRPO: the large model samples its own group and updates on it
            t0 = time.perf_counter()
            engines.sync_weights(large_B, engine_B)
            ro_B = rollout(engine_B, problems, step, 1)
            out["B_rollout"] = time.perf_counter() - t0
            acc, fmt = cd.task_rewards(grader, ro_B, args)
            own = ro_B.batch(pad, d.device)
            adv_BT = common.group_advantages((acc + fmt).view(-1, G), args.adv_scale).view(-1, 1) * own.mask_BT
            cd.ppo_update(large_B, opt_B, own, adv_BT, None, None, args.large_lr, vocab, args)
            out["B"], out["B_tokens"] = time.perf_counter() - t0, ro_B.num_tokens

        for phase in ((phase_A, phase_B) if step % 2 else (phase_B, phase_A)):
            phase()
        d_BT = cd.kd_logratio(out["logp_L"], logp_S_BT, batch.mask_BT, args.kd_clip)
        adv_BT, _ = cd.small_advantages(acc_B.view(-1, G), fmt_B.view(-1, G), d_BT, batch.mask_BT, args)
        cd.ppo_update(small, opt, batch, adv_BT, None, None, args.lr, vocab, args)
        engines.sync_weights(small, engine)
        if step > 0:
            for k, v in (("small_rollout", t_small), ("A_large_step", out["A"]), ("B_large_step", out["B"]),
                         ("B_rollout", out["B_rollout"]), ("A_tokens", ro.num_tokens), ("B_tokens", out["B_tokens"])):
                times[k].append(v)
        print(f"  seed {args.seed} step {step}: A {out['A']:.2f}s  B {out['B']:.2f}s", flush=True)
    benches = common.load_benchmarks(args.eval_data, args.eval_data_dir, args.eval_limit)
    s = engines.Sampling(args.eval_max_new_tokens, args.eval_temperature, args.eval_top_p, args.eval_top_k)

    def accuracy(model) -> float:  # through B's engine: one HF replica of the large model's shape is enough
        engines.sync_weights(model, engine_B)
        res = engines.evaluate(engine_B, tok, benches, grader, args.prompt_template, args.eval_samples, s, [1], d,
                               args.seed, args.max_prompt_tokens, args.chat_template)
        return statistics.mean(r[f"avg@{args.eval_samples}"] for r in res.values())

    times |= {"A_accuracy": [accuracy(large_A)], "B_accuracy": [accuracy(large_B)],
              "start_accuracy": [accuracy(runtime.load_model(large_path, d, trainable=False, vocab=vocab))]}
    grader.close()
    return times


def main() -> None:
    argv = sys.argv[1:]
    script_args = argv[argv.index("--") + 1:] if "--" in argv else ["--preset", "tiny"]
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    d = runtime.init_distributed()
    results = {}
    for seed in a.seeds:
        args = cli.parse_args(cd.Args, cd.PRESETS, script_args + ["--seed", str(seed)])
        t = run_seed(args, d, a.steps)
        results[seed] = {k: statistics.mean(v) for k, v in t.items()}
        results[seed]["ratio"] = statistics.mean(x / y for x, y in zip(t["A_large_step"], t["B_large_step"]))
        print(f"seed {seed}: {results[seed]}", flush=True)

    def fmt(key, digits=3):
        xs = [r[key] for r in results.values()]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"

    table = "\n".join([
        "| large-model step | seconds | tokens per step |", "|---|---|---|",
        f"| A: CoDistill, on the small model's rollouts (score + update) | {fmt('A_large_step')} | "
        f"{fmt('A_tokens', 0)} |",
        f"| B: standard GRPO, on its own rollouts (sample + update) | {fmt('B_large_step')} | {fmt('B_tokens', 0)} |",
        f"| of which B's sampling | {fmt('B_rollout')} | |",
        f"| ratio A / B (per step, then averaged) | {fmt('ratio')} | |",
        f"| for scale: the small model's sampling | {fmt('small_rollout')} | |", "",
        "| large model, held-out accuracy (mean avg@n) | warm start | A: CoDistill | B: standard GRPO |",
        "|---|---|---|---|",
        f"| after {a.steps} steps | {fmt('start_accuracy')} | {fmt('A_accuracy')} | {fmt('B_accuracy')} |"])
    out = ROOT / "bench" / "out" / "codistill_speed"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(f"`{' '.join(sys.argv)}`, seeds {a.seeds}, {a.steps - 1} timed steps each\n\n"
                                  f"{table}\n")
    print(table)
    runtime.finish()


if __name__ == "__main__":
    main()
