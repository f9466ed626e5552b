"""pass@k, k = 1..n, of S2L-PO's explorer (--explorer) and learner (--model): the paper's motivation, checkable for
any pair. Each model samples n completions per problem of the benchmarks (--passk-data, default --eval-data;
--eval-limit and the evaluation sampling apply), graded by the verifier; pass@k is the unbiased estimator, averaged
over problems.

    python bench/s2l_passk.py --preset tiny                        # tiny:small vs tiny:base, 256 samples per problem
    python bench/s2l_passk.py --preset tiny --eval-limit 64 --output-dir bench/out/s2l_passk
    python bench/s2l_passk.py --rollout vllm --passk-models explorer --output-dir D   # vLLM: one model per run,
    python bench/s2l_passk.py --rollout vllm --passk-models learner --output-dir D   # into the same folder

Takes every flag of s2l_po.py (the models, prompt template, evaluation settings, rollout engine) and its presets.
Writes <output-dir>/passk.json (per model and benchmark: the correct counts per problem and the pass@k curve; a run
into a folder that already has one adds its models to it) and <output-dir>/passk.png.
"""

import dataclasses
import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import common  # noqa: E402
import engines  # noqa: E402
import runtime  # noqa: E402
import s2l_po  # noqa: E402
import verifiers  # noqa: E402
from cli import arg  # noqa: E402


@dataclass
class Args(s2l_po.Args):
    passk_models: str = arg("explorer,learner", "models the probe samples (one per invocation with vLLM)")
    passk_samples: int = arg(256, "samples per problem n; pass@k for k = 1..n (unbiased)")
    passk_data: str = arg("", "probe benchmarks (default: --eval-data); --eval-limit and eval sampling apply")


PRESETS = {name: dict(p) for name, p in s2l_po.PRESETS.items()}
PRESETS["tiny"] |= dict(passk_samples=256, passk_data="tiny_add,tiny_mul,tiny_lin")


def passk_probe(args: Args, d, tok, vocab: int, out: Path, log) -> dict:
    roles = [r.strip() for r in args.passk_models.split(",") if r.strip()]
    if not roles or set(roles) - {"explorer", "learner"}:
        raise ValueError(f"--passk-models {args.passk_models!r}: name explorer, learner or both, comma-separated")
    if args.rollout == "vllm" and len(roles) > 1:
        raise ValueError("with --rollout vllm the probe samples one model per process (vLLM holds one): run it "
                         "twice into the same --output-dir, with --passk-models explorer, then learner")
    benches = common.load_benchmarks(args.passk_data or args.eval_data, args.eval_data_dir, args.eval_limit)
    sampling = engines.Sampling(args.eval_max_new_tokens, args.eval_temperature, args.eval_top_p, args.eval_top_k)
    grader = verifiers.Grader(args.grader_workers, args.grader_timeout, args.answer_format)
    path_json = out / "passk.json"
    res = json.loads(path_json.read_text()) if path_json.exists() else {"models": {}}
    res |= {"sampling": dataclasses.asdict(sampling), "n": args.passk_samples, "args": dataclasses.asdict(args)}
    for role in roles:
        name = args.explorer if role == "explorer" else args.model
        path = runtime.resolve(name, d)
        runtime.check_same_tokenizer(tok, runtime.load_tokenizer(path), "--model", f"the {role}")
        model = runtime.load_model(path, d, trainable=False, vocab=vocab)
        eng = engines.make_engine(args.rollout, path, d, tok, vocab, args)
        engines.sync_weights(model, eng)
        del model
        curves = {}
        for bi, (bench, rows) in enumerate(benches.items()):
            mine = rows[d.rank::d.world]
            prompts = [common.encode_prompt(tok, r["problem"], args.prompt_template, args.max_prompt_tokens)
                       for r in mine]
            seed = runtime.rollout_seed(args.seed, 0, d.rank, salt=5000 + bi)
            outs = eng.generate(prompts, args.passk_samples, sampling, seed) if mine else []
            counts = [int(sum(grader([tok.decode(c.token_ids, skip_special_tokens=True) for c in g],
                                     [r["answer"]] * len(g)))) for r, g in zip(mine, outs)]
            counts = [c for part in runtime.gather_objects(counts, d) for c in part]
            n = args.passk_samples
            curves[bench] = {"correct": counts, "pass@k": [sum(common.pass_at_k(n, c, k) for c in counts) / len(counts)
                                                           for k in range(1, n + 1)]}
            curve = curves[bench]["pass@k"]
            log(f"[passk] {role} {bench}: pass@1 {curve[0]:.3f}  pass@{n} {curve[-1]:.3f}")
        res["models"][role] = {"name": name, "benchmarks": curves}
        del eng
        gc.collect()
    grader.close()
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        path_json.write_text(json.dumps(res))
        plot_passk(res, out / "passk.png")
    return res


def plot_passk(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    benches = sorted({b for m in res["models"].values() for b in m["benchmarks"]})
    fig, axes = plt.subplots(1, len(benches), figsize=(3.0 * len(benches), 2.6), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for role, m in sorted(res["models"].items()):
            if bench in m["benchmarks"]:
                y = m["benchmarks"][bench]["pass@k"]
                ax.plot(range(1, len(y) + 1), y, label=f"{role} ({m['name']})", lw=1.5)
        ax.set_xscale("log", base=2)
        ax.set_title(bench, fontsize=9)
        ax.set_xlabel("k", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("pass@k", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(args: Args) -> None:
    d, out, _ = runtime.start(args, __file__)
    s2l_po.check_args(args)
    if args.passk_samples < 1:
        raise ValueError("--passk-samples must be at least 1")
    tok = runtime.load_tokenizer(runtime.resolve(args.model, d))
    say = (lambda msg: print(msg, flush=True)) if d.main else (lambda msg: None)
    passk_probe(args, d, tok, len(tok), out, say)  # logits are sliced to the shared tokenizer, as in training
    runtime.finish()


if __name__ == "__main__":
    main(cli.parse_args(Args, PRESETS))
