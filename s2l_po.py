"""S2L-PO: Smaller Models are Natural Explorers for Policy-Level Diversity in GRPO
(Ren, Xu, Lin et al., ICML 2026, arXiv 2605.30789).

A frozen small *explorer* π_ω supplies part of every GRPO group of a large *learner* π_θ early in training, and
the share is annealed away until training is plain on-policy GRPO (Algorithm 1):

    step i ≤ T_mix:  α_i = 1 − (i−1)/(T_mix−1),   G_w = ⌈α_i·G⌉ rollouts from π_ω,   G_s = G − G_w from π_θ
    step i > T_mix:  G_w = 0                                                              (on-policy GRPO)
    O = O_ω ∪ O_θ   — ONE group per prompt, one verifier, one joint advantage  Â_i = (r_i − mean_O r)/(std_O r + ε)
    J(θ) = token-mean over O of  min(ρ Â, clip(ρ, 1−ε, 1+ε) Â)  −  β·k3(π_θ ‖ π_ref),     ρ = π_θ / π_θold

π_θold is the learner on every token, the explorer's included (no importance correction: the released code
recomputes the learner's log-probs on the explorer's tokens); π_ref is the learner's initial weights. The explorer
only samples, never takes a gradient, and is frozen, so its rollouts come from an offline *bank* generated once
before training (32 per prompt at T 0.7, top-p 0.95) and subsampled per step.

Flags for the paper's baseline and ablations, and the released code's variants:
    --t-mix 0                          plain GRPO at equal steps (no explorer, no bank): the paper's baseline
    --t-mix N                          length of the annealing (paper 8 of 16 steps; its "5-step transition")
    --schedule linear|cosine|step|constant   linear is the paper's; step holds α_1 until T_mix; constant holds
                                       α_1 for the whole run (no annealing)
    --group-mode mixed|alternating     one mixed group (paper) / an explorer-only and a learner-only update per
                                       step, each with its own prompts and advantages, ⌈·⌉ on both sides (code)
    --is-correction none|token_tis     none (paper, code) / min(π_θold/π_ω, --is-cap) on explorer tokens (an
                                       early config of the code)
    --bank-only                        build the explorer bank and exit (the first of two runs with vLLM)

Reconstructions and deviations (evidence: the paper and its released training scripts):
  1. Mixed groups by default (the paper); the released scripts alternate single-source steps instead, and
     --group-mode alternating reproduces them (a logical step there makes two updates, on two prompt batches).
  2. T_mix = 1, where the formula divides by zero, is one explorer-only step and then GRPO.
  3. One verifier, math-verify on the last \\boxed{}, grades both sources (the code graded explorer samples by a
     string match and learner samples with DAPO's ±1 "Answer:" reward). One prompt for both sources: the bare
     problem with a \\boxed{} instruction; DAPO's own "Answer:" wrapper is removed from its problems.
  4. Explorer responses are capped at --max-new-tokens (the code sampled 30k tokens, graded the whole text and
     trained on its first 4,096). The bank holds only the problems that explorer steps will draw (the data order
     is fixed by the seed) rather than the whole dataset, and grows when a later run needs more.
  5. Optimisation as the code's online steps: one pass in 32 mini-batches of 32 prompts × G, AdamW lr 1e-6,
     weight decay 0.01, clip 0.2 with dual clip 3, k3 KL 0.001 (its exponential's argument capped at 20, verl clamps k3 at
     ±10). The code's offline steps used mini-batches of 32 *sequences* (32·G_w updates); not reproduced.
  6. Evaluation avg@16 at T 0.7, top-p 0.8, top-k 20 (non-thinking) on AIME 24/25, MATH-500, OlympiadBench, up
     to 8,192 tokens (paper 32k-39k), without the presence penalty 1.5, graded by math-verify (the code's scorer
     also accepted a gold answer contained in the prediction).
  7. Data: DAPO-Math-17k deduplicated by prompt (open-r1's processed copy of it).

This project keeps one vLLM engine per process (each reserves its own memory), and the explorer and learner
differ in shape, so with --rollout vllm the bank is built by a separate invocation with --bank-only (the explorer
is then that process's one vLLM engine), and the training run reuses it; it stops with that command if the bank
is missing. With --rollout hf the training run builds a missing bank itself. The pass@k probe of explorer and
learner (k = 1…256, the paper's motivation) is bench/s2l_passk.py; under vLLM it probes one model per invocation.

Tiny preset: the learner is tiny:base, not tiny:large. tiny:large already works every problem out, so a weaker
explorer has nothing to show it; tiny:base is the large architecture fine-tuned to answer 80% of the time at once,
as an untuned base model rarely reasons, and the explorer tiny:small works most answers out. T_mix is 20 of the
40 steps, half the run as in the paper (T_mix 8 of 16 steps); lr 1e-4 is the toy world's working RL rate.

Run:
    torchrun --nproc_per_node 8 s2l_po.py --rollout vllm --bank-only     # 1. explorer bank (once, reused)
    torchrun --nproc_per_node 8 s2l_po.py --rollout vllm                 # 2. Qwen3-1.7B-Base -> Qwen3-8B-Base
    python s2l_po.py --preset 1gpu --rollout vllm --bank-only && python s2l_po.py --preset 1gpu --rollout vllm
    python s2l_po.py --preset tiny                                       # CPU, toy world, about a minute
    python bench/s2l_passk.py --preset tiny                              # explorer vs learner pass@k curves
"""

import dataclasses
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
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
    # --- run -------------------------------------------------------------------------------------------
    preset: str = arg("paper", "bundle of defaults: paper | 1gpu | tiny (CPU toy world); explicit flags win")
    output_dir: str = arg("", "run directory (default runs/<script>-<preset>-<time>)")
    resume: str = arg("", "continue a run: its directory (latest checkpoint) or a checkpoints/step_N folder")
    overwrite: bool = arg(False, "empty an --output-dir that holds a run (otherwise such a directory is refused)")
    seed: int = arg(0, "seed for model init, data order, rollouts and the explorer bank")
    # --- policy and data -------------------------------------------------------------------------------
    model: str = arg("Qwen/Qwen3-8B-Base", "learner (trained): hub name, folder, tiny:base")
    train_data: str = arg("open-r1/DAPO-Math-17k-Processed:all", "hub dataset, .jsonl file, or tiny:<families>")
    train_split: str = arg("train", "split of --train-data")
    problem_key: str = arg("prompt", "column holding the problem text")
    answer_key: str = arg("solution", "column holding the gold answer")
    prompt_template: str = arg("{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
                               "user message; {problem} is filled in")
    answer_format: Literal["boxed", "answer_tag"] = arg("boxed", "where the final answer is read from")
    max_prompt_tokens: int = arg(512, "prompts are left-truncated to this many tokens")
    # --- evaluation ------------------------------------------------------------------------------------
    eval_data: str = arg("aime24,aime25,math500,olympiadbench",
                         "comma-separated benchmarks (names, .jsonl paths, tiny_<family>)")
    eval_data_dir: str = arg("", "folder with <benchmark>.jsonl files, used before the hub")
    eval_limit: int = arg(0, "evaluate on the first N problems of each benchmark (0 = all)")
    eval_every: int = arg(4, "evaluate every N steps (and at the start and end); 0 = only at the end")
    eval_samples: int = arg(16, "samples per problem: avg@n, pass@k, maj@n")
    eval_temperature: float = arg(0.7, "evaluation sampling temperature")
    eval_top_p: float = arg(0.8, "evaluation top-p")
    eval_top_k: int = arg(20, "evaluation top-k (0 = off)")
    eval_max_new_tokens: int = arg(8192, "evaluation response budget")
    # --- rollouts --------------------------------------------------------------------------------------
    total_steps: int = arg(16, "logical steps T (each one optimizer pass over its rollout batch)")
    prompts_per_step: int = arg(1024, "P: prompts per step over all ranks")
    group_size: int = arg(16, "G: completions per prompt, explorer and learner together")
    max_new_tokens: int = arg(4096, "response budget in training, the explorer's included")
    temperature: float = arg(1.0, "learner rollout temperature")
    top_p: float = arg(1.0, "learner rollout top-p")
    top_k: int = arg(0, "learner rollout top-k (0 = off)")
    rollout: Literal["hf", "vllm"] = arg("hf", "rollout engine: vllm (colocated, GPU or CPU) or hf (any device)")
    rollout_batch_size: int = arg(256, "hf engine: sequences generated at once")
    vllm_gpu_memory_utilization: float = arg(0.3, "vllm engine: its share of GPU memory")
    vllm_sleep_level: int = arg(2, "vllm engine: 1 offloads weights to CPU while training, 2 discards them (GPU)")
    vllm_kv_cache_gib: float = arg(0.0, "vllm engine: KV-cache GiB (0 = on GPUs from the memory share, on CPUs 1)")
    # --- optimisation ----------------------------------------------------------------------------------
    lr: float = arg(1e-6, "AdamW learning rate")
    lr_warmup_steps: int = arg(0, "linear warmup steps")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    micro_batch_size: int = arg(4, "sequences per forward/backward")
    num_minibatches: int = arg(32, "optimizer steps per rollout batch (the code: mini-batches of 32 prompts)")
    clip_low: float = arg(0.2, "PPO clip ε_low")
    clip_high: float = arg(0.2, "PPO clip ε_high")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = arg("token-mean",
                                                                                            "loss aggregation")
    adv_scale: Literal["std", "none"] = arg("std", "group advantage: std-normalised (GRPO) or none (Dr. GRPO)")
    grad_checkpointing: bool = arg(True, "activation checkpointing of decoder layers (CUDA only)")
    logprob_chunk: int = arg(1024, "tokens per chunk of LM head + log-softmax")
    # --- bookkeeping -----------------------------------------------------------------------------------
    save_every: int = arg(4, "checkpoint every N steps (0 = never)")
    keep_checkpoints: int = arg(2, "checkpoints kept on disk")
    log_samples: int = arg(2, "rollouts per rank written to samples.jsonl each step")
    report_to: Literal["none", "wandb", "tensorboard"] = arg("none", "also log metrics, evaluations and the config to W&B or TensorBoard")
    grader_workers: int = arg(2, "math-verify worker processes per rank")
    grader_timeout: float = arg(5.0, "seconds per answer before it scores 0")
    # --- S2L-PO ------------------------------------------------------------------------------------------
    explorer: str = arg("Qwen/Qwen3-1.7B-Base", "frozen small explorer sharing the learner's tokenizer")
    allow_template_mismatch: bool = arg(False, "accept an explorer whose chat template differs from the "
                                        "learner's (it would score prompts in the learner's format)")
    t_mix: int = arg(8, "T_mix: steps 1..T_mix mix explorer rollouts in; 0 = plain GRPO (no explorer)")
    schedule: Literal["linear", "cosine", "step", "constant"] = arg("linear", "how the explorer share α anneals")
    alpha_start: float = arg(1.0, "α_1, the explorer share at step 1 (held by the step and constant schedules)")
    group_mode: Literal["mixed", "alternating"] = arg("mixed", "one mixed group (paper) or single-source updates "
                                                      "alternating within a step (released code)")
    is_correction: Literal["none", "token_tis"] = arg("none", "importance weights on explorer tokens")
    is_cap: float = arg(2.0, "token_tis: cap C of min(π_θold/π_ω, C)")
    kl_coef: float = arg(1e-3, "β of the k3 KL to the reference (the learner's initial weights); 0 skips it")
    dual_clip: float = arg(3.0, "dual-clip c: a negative-advantage token's loss is at most c·|A| (0 = off)")
    bank_samples: int = arg(32, "explorer completions stored per prompt, subsampled to G_w each step")
    bank_temperature: float = arg(0.7, "explorer sampling temperature")
    bank_top_p: float = arg(0.95, "explorer sampling top-p")
    bank_top_k: int = arg(0, "explorer sampling top-k (0 = off)")
    bank_dir: str = arg("", "where explorer banks live (default $TANDEM_CACHE/s2l_banks or ~/.cache/tandem/...)")
    bank_only: bool = arg(False, "build (or extend) the explorer bank for this run's settings, then exit")


PRESETS = {
    "paper": {},
    "1gpu": dict(model="Qwen/Qwen3-1.7B-Base", explorer="Qwen/Qwen3-0.6B-Base", prompts_per_step=64, group_size=8,
                 total_steps=100, t_mix=50, num_minibatches=2, max_new_tokens=2048, eval_max_new_tokens=4096,
                 eval_data="aime24,math500", eval_samples=4, micro_batch_size=4, eval_every=25, save_every=25),
    "tiny": dict(model="tiny:base", explorer="tiny:small", train_data="tiny:add,mul,lin", problem_key="problem",
                 answer_key="answer", prompt_template="{problem}", max_prompt_tokens=64,
                 eval_data="tiny_add,tiny_mul,tiny_lin", eval_limit=128, eval_every=10, eval_samples=4,
                 eval_temperature=1.0, eval_top_p=1.0, eval_top_k=0, eval_max_new_tokens=48, total_steps=40,
                 t_mix=20, prompts_per_step=16, group_size=8, max_new_tokens=48, lr=1e-4, weight_decay=0.0,
                 micro_batch_size=64, num_minibatches=1, save_every=20, grader_workers=1, logprob_chunk=4096),
}


# ----------------------------------------------------------------------------------------------------------
# The method: the explorer schedule (Algorithm 1) and the GRPO loss on mixed groups
# ----------------------------------------------------------------------------------------------------------
def explorer_share(step: int, args: Args) -> float:
    """α_i for the 1-based step i = step + 1: the paper's linear anneal α_i = 1 − (i−1)/(T_mix−1) from α_1 to 0
    at T_mix, or an alternative; 0 after T_mix (on-policy GRPO)."""
    i = step + 1
    if args.schedule == "constant":
        return args.alpha_start
    if i > args.t_mix:
        return 0.0
    if args.schedule == "step":
        return args.alpha_start
    x = (i - 1) / (args.t_mix - 1) if args.t_mix > 1 else 0.0  # T_mix = 1: one explorer step (reconstruction 2)
    if args.schedule == "cosine":
        return args.alpha_start * 0.5 * (1.0 + math.cos(math.pi * x))
    return args.alpha_start * (1.0 - x)


def ceil_count(frac: float, G: int) -> int:
    return math.ceil(round(frac * G, 9))  # 9·(1 − 1/3) is 6.000000000000001 in floating point: ⌈·⌉ must give 6


def substeps(step: int, args: Args) -> list[tuple[int, int]]:
    """(G_w, G_s) of each update at `step`: one mixed group, G_w = ⌈α·G⌉ and G_s = G − G_w (paper); or, alternating,
    an explorer-only update with ⌈α·G⌉ and a learner-only one with ⌈(1−α)·G⌉ (the released code), empty ones
    skipped."""
    a, G = explorer_share(step, args), args.group_size
    if args.group_mode == "mixed":
        g_w = ceil_count(a, G)
        return [(g_w, G - g_w)]
    g_w, g_s = ceil_count(a, G), ceil_count(1.0 - a, G)
    return [(g_w, 0)] * (g_w > 0) + [(0, g_s)] * (g_s > 0)


def s2l_loss(logp_BT, old_logp_BT, ref_logp_BT, adv_B, isw_BT, mask_BT, norm, args: Args):
    """J_GRPO over the mixed group with the k3 KL to the reference, on one micro-batch. Explorer tokens are scored
    by the learner like its own (ρ = π_θ/π_θold), optionally weighted by isw = min(π_θold/π_ω, C)."""
    adv_BT = adv_B[:, None].expand_as(logp_BT)
    pg_BT, low_BT, high_BT = common.ppo_clip_loss(logp_BT, old_logp_BT, adv_BT, args.clip_low, args.clip_high)
    if args.dual_clip > 0:  # verl's dual clip: a token with A < 0 and a runaway ratio costs at most c·|A|
        pg_BT = torch.where(adv_BT < 0, torch.minimum(pg_BT, -args.dual_clip * adv_BT), pg_BT)
    kl_BT = common.kl_estimate(logp_BT, ref_logp_BT, "k3")  # exp(lp_ref − lp) − (lp_ref − lp) − 1
    loss_pg = common.agg_loss(isw_BT * pg_BT, mask_BT, args.loss_agg, norm)
    loss_kl = common.agg_loss(kl_BT, mask_BT, args.loss_agg, norm)
    return loss_pg + args.kl_coef * loss_kl, loss_pg, loss_kl, low_BT, high_BT


# ----------------------------------------------------------------------------------------------------------
# The explorer bank: the frozen explorer's rollouts, generated once (engines.CompletionBank stores them)
# ----------------------------------------------------------------------------------------------------------
def bank_problems(rows: list[dict], args: Args) -> list[dict]:
    """The problems the explorer steps will draw: the data order is fixed by the seed, so replay it."""
    stream = common.PromptStream(rows, args.prompts_per_step, 0, 1, args.seed)
    need = {}
    for step in range(args.total_steps):
        for g_w, _ in substeps(step, args):
            batch = stream.next()
            if g_w:
                need.update((r["problem"], r) for r in batch)
    return list(need.values())


def ensure_bank(args: Args, d, tok, vocab: int, rows: list[dict], log) -> engines.CompletionBank:
    """The run's explorer bank, with the completions of every problem the explorer steps draw; the missing ones are
    generated by the explorer (sharded over ranks) under the bank's lock, so that runs started together build it
    once. The bank's folder is named by the settings that made it, the explorer's weights included."""
    explorer_path = runtime.resolve(args.explorer, d)
    runtime.check_same_tokenizer(tok, runtime.load_tokenizer(explorer_path), "--model", "--explorer",
                                 allow_template_mismatch=args.allow_template_mismatch)
    sampling = engines.Sampling(args.max_new_tokens, args.bank_temperature, args.bank_top_p, args.bank_top_k)
    fingerprint = runtime.broadcast_object(engines.weights_fingerprint(explorer_path) if d.main else None, d)
    settings = {"explorer": args.explorer, "weights": fingerprint, "n": args.bank_samples,
                "sampling": dataclasses.asdict(sampling), "seed": args.seed, "format": 1}
    root = Path(args.bank_dir) if args.bank_dir else \
        Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem")) / "s2l_banks"
    prompts = [common.encode_prompt(tok, r["problem"], args.prompt_template, args.max_prompt_tokens)
               for r in bank_problems(rows, args)]
    with engines.CompletionBank.locked(root, settings, d) as bank:
        missing = bank.missing(prompts)
        if missing and args.rollout == "vllm" and not args.bank_only:
            raise RuntimeError(f"the explorer bank lacks {len(missing)} of this run's {len(prompts)} prompts, and "
                               f"with --rollout vllm this process's one vLLM engine is the learner's: build the bank "
                               f"first with the same flags plus --bank-only (e.g. torchrun ... s2l_po.py <flags> "
                               f"--bank-only)")
        if missing:
            log(f"[s2l] explorer bank {bank.dir}: generating {len(missing)} prompts x {args.bank_samples} "
                f"({len(prompts) - len(missing)} already there)")
            explorer = runtime.load_model(explorer_path, d, trainable=False, vocab=vocab)
            eng = engines.make_engine(args.rollout, explorer_path, d, tok, vocab, args)
            engines.sync_weights(explorer, eng)
            del explorer
            bank.add(missing, eng, sampling, args.seed, d, log=lambda msg: log(f"[s2l] explorer bank: {msg}"))
    return bank


def mixed_rollouts(engine, bank, tok, problems, g_w: int, g_s: int, sampling, args: Args, step: int, sub: int, d):
    """G = g_w + g_s completions per problem, explorer first: g_w drawn from the bank, g_s sampled from the
    learner (whose rollout engine holds its latest weights). Also returns source_B, 1.0 where the explorer wrote."""
    prompts = [common.encode_prompt(tok, r["problem"], args.prompt_template, args.max_prompt_tokens) for r in problems]
    learner = engine.generate(prompts, g_s, sampling, runtime.rollout_seed(args.seed, step, d.rank, salt=sub)) \
        if g_s else []
    comps = []
    for p, ids in enumerate(prompts):
        if g_w:  # the draw depends on (seed, step, prompt) only: the same on any world size and after --resume
            comps += bank.draw(ids, g_w, random.Random(f"{args.seed}|{step}|{sub}|{engines.prompt_key(ids)}"))
        comps += learner[p] if g_s else []
    texts = [tok.decode(c.token_ids, skip_special_tokens=True) for c in comps]
    G = g_w + g_s
    ro = engines.Rollouts(problems, [p for p in prompts for _ in range(G)], comps, texts, G)
    source_B = torch.tensor(([1.0] * g_w + [0.0] * g_s) * len(problems))
    return ro, source_B


# ----------------------------------------------------------------------------------------------------------
# Train loop
# ----------------------------------------------------------------------------------------------------------
def check_args(args: Args) -> None:
    if args.t_mix < 0:
        raise ValueError(f"--t-mix {args.t_mix}: use 0 (plain GRPO) or the number of mixing steps")
    if not 0.0 <= args.alpha_start <= 1.0:
        raise ValueError(f"--alpha-start {args.alpha_start}: the explorer share must lie in [0, 1]")
    if args.bank_samples < 1:
        raise ValueError("--bank-samples must be at least 1")
    if args.is_cap <= 0:
        raise ValueError(f"--is-cap {args.is_cap}: the importance-weight cap must be positive")


def source_metrics(meter, correct_B, correct_PG, adv_B, source_B, lengths_B) -> None:
    """One update's groups without a reward signal, and the reward, advantage and response length of each source's
    sequences (where it wrote some)."""
    meter.set({"reward/frac_zero_std": (correct_PG.std(1) == 0).float().mean()})
    for s, sel in (("explorer", source_B > 0), ("learner", source_B == 0)):
        if sel.any():
            a = adv_B.cpu()[sel]
            meter.set({f"reward/{s}": correct_B[sel].mean(), f"adv/{s}_mean": a.mean(),
                       f"adv/{s}_std": a.std() if len(a) > 1 else 0.0,
                       f"response/{s}_length": lengths_B[sel].float().mean()})


def merge_updates(parts: list[dict]) -> dict:
    """One step's update metrics (alternating mode makes two updates): the maximum of a `/max` key, else the mean
    over the updates that logged it."""
    out = {}
    for k in {k for p in parts for k in p}:
        vals = [p[k] for p in parts if k in p]
        out[k] = max(vals) if k.endswith("/max") else sum(vals) / len(vals)
    return out


def uses_explorer(args: Args) -> bool:
    return args.bank_only or any(g_w for step in range(args.total_steps) for g_w, _ in substeps(step, args))


def model_fields(args: Args) -> tuple[str, ...]:
    """The model flags this run loads: the explorer only where its rollouts are mixed in (or --bank-only)."""
    return ("model", "explorer") if uses_explorer(args) else ("model",)


def main(args: Args) -> None:
    check_args(args)
    d, out, ckpt = runtime.start(args, __file__)

    # --- models and data ---------------------------------------------------------------------------------
    learner_path = runtime.resolve(args.model, d)
    tok = runtime.load_tokenizer(learner_path)
    vocab = len(tok)  # logits are sliced to the shared tokenizer: Qwen pads vocab_size differently per size
    rows = common.load_problems(args.train_data, args.train_split, args.problem_key, args.answer_key, seed=args.seed)
    rows = [{**r, "problem": common.strip_dapo_wrapper(r["problem"])} for r in rows]  # reconstruction 3
    say = (lambda msg: print(msg, flush=True)) if d.main else (lambda msg: None)
    bank = ensure_bank(args, d, tok, vocab, rows, say) if uses_explorer(args) else None
    if args.bank_only:
        say(f"[s2l] explorer bank ready: {bank.dir} ({len(bank.index)} prompts)")
        runtime.finish()
        return
    learner = runtime.load_model(learner_path, d, trainable=True, vocab=vocab, grad_ckpt=args.grad_checkpointing)
    ref = runtime.load_model(learner_path, d, trainable=False, vocab=vocab) if args.kl_coef > 0 else None
    engine = engines.make_engine(args.rollout, learner_path, d, tok, vocab, args)
    opt = torch.optim.AdamW(learner.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    grader = verifiers.Grader(args.grader_workers, args.grader_timeout, args.answer_format)
    stream = common.PromptStream(rows, args.prompts_per_step, d.rank, d.world, args.seed)
    benches = common.load_benchmarks(args.eval_data, args.eval_data_dir, args.eval_limit)
    train_sampling = engines.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    eval_sampling = engines.Sampling(args.eval_max_new_tokens, args.eval_temperature, args.eval_top_p, args.eval_top_k)
    start = 0
    if ckpt:
        state = runtime.load_checkpoint(ckpt, {"learner": learner}, {"learner": opt}, d)
        stream.load_state_dict(state["data"])
        start = state["step"]
    log = runtime.RunLog(out, d, args, start, args.total_steps)
    log.print(f"[s2l] {out}  world={d.world}  device={d.device.type}  steps {start}->{args.total_steps}  "
              f"explorer {'bank ' + str(bank.dir) if bank else 'none (GRPO)'}")
    engines.sync_weights(learner, engine)

    def run_eval(step: int, tag: str = "") -> None:
        res = engines.evaluate(engine, tok, benches, grader, args.prompt_template, args.eval_samples, eval_sampling,
                               [1, 4, 8, 16, 32], d, args.seed, args.max_prompt_tokens)
        log.eval(step, res, tag)

    def grpo_update(meter, step: int, sub: int, g_w: int, g_s: int) -> tuple:
        """One GRPO update on G_w explorer + G_s learner completions per prompt: its metrics, rewards, rollouts."""
        part, expl = runtime.Meter(clock=False), runtime.Meter(clock=False)  # sums over all / explorer tokens
        # --- rollout: G_w explorer completions from the bank + G_s from the learner, one group per prompt
        with meter.time("rollout"):
            ro, source_B = mixed_rollouts(engine, bank, tok, stream.next(), g_w, g_s, train_sampling, args, step,
                                          sub, d)
            engine.sleep()  # free the GPU for the update (vLLM); the weight sync below wakes it

        # --- reward: one verifier for both sources -> one joint group advantage over the mixed group
        with meter.time("reward"):
            correct_B = torch.tensor(grader(ro.texts, ro.answers))
            correct_PG = correct_B.view(-1, ro.G)
            adv_B = common.group_advantages(correct_PG, args.adv_scale).view(-1).to(d.device)
        batch = ro.batch(tok.pad_token_id, d.device)
        engine_logp_BT = ro.engine_logprobs(batch.T, d.device)  # explorer tokens: π_ω's sampling log-probs
        expl_BT = source_B.to(d.device)[:, None] * batch.mask_BT
        n_tok, n_expl = batch.mask_BT.sum().item(), expl_BT.sum().item()
        updates = runtime.minibatches(batch, args.micro_batch_size, args.num_minibatches)

        # --- old log-probs: the learner's, on explorer tokens too; on-policy they are the live ones, detached
        old_logp_BT = common.score_logprobs(learner, batch, vocab, args.temperature, args.micro_batch_size,
                                            args.logprob_chunk) if len(updates) > 1 else None

        # --- update: the reference scores the tokens, the learner takes the GRPO step on the mixed group
        with meter.time("update"):
            for update in updates:
                for rows, mb, norm in runtime.accumulate(update, args.max_new_tokens):
                    r_logp_N = None
                    if ref is not None:  # before the learner's forward: its transients never meet the graph's
                        with meter.time("ref"), torch.no_grad():
                            h_r_NH = common.response_hidden(ref, mb)
                            r_logp_N, _ = common.logprobs_from_hidden(h_r_NH, ref.get_output_embeddings(),
                                                                      common.response_targets(mb), vocab,
                                                                      args.temperature, args.logprob_chunk, False)
                        runtime.release(ref)  # FSDP2 keeps a root gathered until a backward, which never comes
                    h_NH = common.response_hidden(learner, mb)
                    logp_N, ent_N = common.logprobs_from_hidden(h_NH, learner.get_output_embeddings(),
                                                                common.response_targets(mb), vocab,
                                                                args.temperature, args.logprob_chunk)
                    if r_logp_N is None:  # no reference: the k3 term vanishes
                        r_logp_N = logp_N.detach()
                    logp_BT, ref_logp_BT = common.to_grid(logp_N, mb), common.to_grid(r_logp_N, mb)
                    old_BT = logp_BT.detach() if old_logp_BT is None else old_logp_BT[rows, :mb.T]
                    e_BT, e_logp_BT = expl_BT[rows, :mb.T], engine_logp_BT[rows, :mb.T]
                    isw_BT = torch.ones_like(old_BT)
                    if args.is_correction == "token_tis":  # min(π_θold/π_ω, C) on explorer tokens, 1 on its own
                        isw_BT = torch.where(e_BT > 0, common.truncated_is_weights(old_BT, e_logp_BT, args.is_cap), 1.0)
                    loss, l_pg, l_kl, low_BT, high_BT = s2l_loss(logp_BT, old_BT, ref_logp_BT, adv_B[rows], isw_BT,
                                                                 mb.mask_BT, norm, args)
                    loss.backward()
                    with torch.no_grad():
                        m = mb.mask_BT
                        part.add({"loss/total": loss, "loss/pg": l_pg, "loss/kl": l_kl}, divide_by=len(updates))
                        part.tokens({"policy/entropy": common.to_grid(ent_N, mb) * m,
                                     "policy/clip_low": low_BT * m, "policy/clip_high": high_BT * m})
                        if n_expl < n_tok:  # the learner's own tokens: the trainer/engine mismatch
                            diff_BT = (old_BT - e_logp_BT).abs() * (m - e_BT)
                            part.tokens({"sampling/logp_diff_mean": diff_BT})
                            part.max({"sampling/logp_diff_max/max": diff_BT})
                        if ref is not None:
                            part.tokens({"kl/ref": common.kl_estimate(logp_BT, ref_logp_BT, "k3") * m})
                        if n_expl:
                            expl.tokens({"explorer/learner_logp": logp_BT * e_BT,
                                         "explorer/logp_gap": (e_logp_BT - logp_BT) * e_BT})
                        if n_expl and args.is_correction == "token_tis":
                            expl.tokens({"is/weight_mean": isw_BT * e_BT,
                                         "is/capped_frac": (isw_BT >= args.is_cap) * e_BT})
                runtime.optimizer_step(learner, opt, args.max_grad_norm, part)

        # --- weight sync: the rollout engine gets the new weights, one parameter at a time
        with meter.time("sync"):
            engines.sync_weights(learner, engine)

        # --- this update's metrics, per source where the two differ
        source_metrics(part, correct_B, correct_PG, adv_B, source_B, batch.mask_BT.sum(1).cpu())
        return part.read(n_tok) | expl.read(n_expl) | ro.stats(), correct_B, ro, source_B

    if start == 0 and args.eval_every and args.total_steps > 0:
        run_eval(0)
    for step in range(start, args.total_steps):
        meter = runtime.Meter()  # the step's timings and totals; each update's metrics are its own
        lr = runtime.set_lr(opt, step, args.lr, args.lr_warmup_steps)
        parts = [grpo_update(meter, step, sub, g_w, g_s) for sub, (g_w, g_s) in enumerate(substeps(step, args))]

        # --- log: the step's updates merged (alternating mode makes two), sequence-weighted where it matters
        meter.set({"reward/mean": torch.cat([p[1] for p in parts]).mean(),
                   "explorer/share": torch.cat([p[3] for p in parts]).mean(),
                   "explorer/alpha": explorer_share(step, args), "lr": lr,
                   "reward/grader_failures": grader.take_failures()})
        metrics = merge_updates([p[0] for p in parts]) | meter.read()  # the step's timings and totals
        metrics["timing_s/update"] -= metrics.get("timing_s/ref", 0.0)
        metrics["perf/tokens_per_s"] = sum(p[2].num_tokens for p in parts) / metrics["timing_s/step"]
        log.metrics(step + 1, runtime.all_reduce_mean(metrics, d), show=("reward/mean", "explorer/share", "kl/ref"))
        for _, correct_B, ro, source_B in parts:
            log.samples(step + 1, [{**s, "source": "explorer" if source_B[i] else "learner"}
                                   for i, s in enumerate(ro.samples(correct_B.tolist(), args.log_samples))])

        # --- eval, then checkpoint (so that a checkpoint implies its step's eval is logged)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.total_steps:
            run_eval(step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            runtime.save_checkpoint(out, step + 1, {"learner": learner}, {"learner": opt},
                                    {"data": stream.state_dict()}, d, args.keep_checkpoints)

    # --- final save, eval, summary
    runtime.save_hf(learner, tok, out / "final", d)
    run_eval(args.total_steps)
    log.close(("reward/mean", "reward/explorer", "reward/learner", "explorer/share", "kl/ref", "response/mean_length"))
    grader.close()
    log.print(f"[s2l] done: {out}")
    runtime.finish()


if __name__ == "__main__":
    main(cli.parse_args(Args, PRESETS, check=check_args, models=model_fields))
