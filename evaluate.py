"""Evaluate any HF-format model on the benchmarks with the training scripts' protocol and output, without training:
a hub name, a run's `final/`, a stage folder of sparse_to_dense.py, or a toy model. The same sampling, grading
(math-verify on the last \\boxed{} or <answer> tag) and summaries as the scripts' own evaluations: avg@n with its
standard error over problems (avg@n_se), unbiased pass@k, maj@n and mean response length per benchmark, written to
<output-dir>/eval.jsonl (one row per benchmark, `step` 0) and printed. Problems are sharded over ranks under torchrun.

    python evaluate.py --model Qwen/Qwen2.5-Math-1.5B --rollout vllm                   # the papers' base-model rows
    torchrun --nproc_per_node 8 evaluate.py --model runs/kdrl-paper-.../final --rollout vllm
    python evaluate.py --preset tiny --model tiny:large                                # CPU toy world
"""

from dataclasses import dataclass
from typing import Literal

import torch

import cli
import common
import engines
import runtime
import verifiers
from cli import arg


@dataclass
class Args:
    preset: str = arg("paper", "bundle of defaults: paper | tiny (CPU toy world); explicit flags win")
    output_dir: str = arg("", "where eval.jsonl goes (default runs/evaluate-<preset>-<time>)")
    overwrite: bool = arg(False, "empty an --output-dir that holds a run (otherwise such a directory is refused)")
    seed: int = arg(0, "seed of the evaluation's sampling")
    model: str = arg("Qwen/Qwen2.5-Math-1.5B", "model to evaluate: hub name, folder (a run's final/), tiny:<size>")
    prompt_template: str = arg("{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
                               "user message; {problem} is filled in")
    chat_template: bool = arg(True, "wrap the prompt in the tokenizer's chat template (false: the raw text)")
    answer_format: Literal["boxed", "answer_tag"] = arg("boxed", "where the final answer is read from")
    max_prompt_tokens: int = arg(1024, "prompts are left-truncated to this many tokens")
    eval_data: str = arg("math500,aime24,aime25,amc23,minerva_math,olympiadbench",
                         "comma-separated benchmarks (names, .jsonl paths, tiny_<family>)")
    eval_data_dir: str = arg("", "folder with <benchmark>.jsonl files, used before the hub")
    eval_limit: int = arg(0, "evaluate on the first N problems of each benchmark (0 = all)")
    eval_samples: int = arg(8, "samples per problem: avg@n, pass@k, maj@n")
    eval_temperature: float = arg(0.6, "evaluation sampling temperature")
    eval_top_p: float = arg(0.95, "evaluation top-p")
    eval_top_k: int = arg(0, "evaluation top-k (0 = off)")
    eval_max_new_tokens: int = arg(3072, "evaluation response budget (prompt + response must fit the model's context: "
                                   "Qwen2.5-Math's is 4,096)")
    rollout: Literal["hf", "vllm"] = arg("hf", "rollout engine: vllm (colocated, GPU or CPU) or hf (any device)")
    rollout_batch_size: int = arg(256, "hf engine: sequences generated at once")
    vllm_gpu_memory_utilization: float = arg(0.8, "vllm engine: its share of GPU memory")
    vllm_sleep_level: int = arg(2, "vllm engine: 1 offloads weights to CPU while training, 2 discards them (GPU)")
    vllm_kv_cache_gib: float = arg(0.0, "vllm engine: KV-cache GiB (0 = on GPUs from the memory share, on CPUs 1)")
    grader_workers: int = arg(2, "math-verify worker processes per rank")
    grader_timeout: float = arg(5.0, "seconds per answer before it scores 0")
    report_to: Literal["none", "wandb", "tensorboard"] = arg("none", "also log the evaluation and the config to W&B "
                                                             "or TensorBoard")


PRESETS = {
    "paper": {},
    "tiny": dict(model="tiny:small", prompt_template="{problem}", max_prompt_tokens=64,
                 eval_data="tiny_add,tiny_mul,tiny_lin", eval_limit=128, eval_samples=4, eval_temperature=1.0,
                 eval_top_p=1.0, eval_max_new_tokens=48, grader_workers=1),
}


def main(args: Args) -> None:
    d, out, _ = runtime.start(args, __file__)
    path = runtime.resolve(args.model, d)
    tok = runtime.load_tokenizer(path)
    model = runtime.load_model(path, d, trainable=False, vocab=len(tok))
    engine = engines.make_engine(args.rollout, path, d, tok, len(tok), args)
    engines.sync_weights(model, engine)  # engines start empty: the same push as in training
    del model
    grader = verifiers.Grader(args.grader_workers, args.grader_timeout, args.answer_format)
    benches = common.load_benchmarks(args.eval_data, args.eval_data_dir, args.eval_limit)
    sampling = engines.Sampling(args.eval_max_new_tokens, args.eval_temperature, args.eval_top_p, args.eval_top_k)
    log = runtime.RunLog(out, d, args, 0, 0)
    with torch.no_grad():
        res = engines.evaluate(engine, tok, benches, grader, args.prompt_template, args.eval_samples, sampling,
                               [1, 4, 8, 16, 32], d, args.seed, args.max_prompt_tokens, args.chat_template)
    log.eval(0, res, "")
    log.close(())
    grader.close()
    log.print(f"[evaluate] {args.model}: {out / 'eval.jsonl'}")
    runtime.finish()


if __name__ == "__main__":
    main(cli.parse_args(Args, PRESETS))
