"""Beyond GRPO and On-Policy Distillation: An Empirical Sparse-to-Dense Reward Principle for Language-Model
Post-Training (Sang, Xu et al., arXiv 2605.12483).

Scarce labels go first to a larger teacher, which sparse-reward RL turns into a reward-shaped policy; a dense
bridge hands it to the smaller deployment student; labels still unused may then train the student (Eq. 6,
L_F → L_R → J_1). Four stages, any subset in order (`--stages 1,2a,2b,3`), each writing an HF-format model
(`stage_<s>/`) that the next stage reads:

  (S1)  teacher GRPO on the upstream labels, with a k3 KL (β = --kl-coef) to the stage's initial policy π_ref:
            L_1  = −(1/Σ|o_i|) Σ_i Σ_t [min(ρ_it·A_i, clip(ρ_it, 1−ε, 1+ε)·A_i) − β·k3_it]
            A_i  = (r_i − mean_G r) / std_G r,   ρ_it = π_θ(o_it) / π_old(o_it),   k3 = π_ref/π_θ − log(π_ref/π_θ) − 1
  (S2a) forward-KL warmup under teacher occupancy (Eq. 5), full vocabulary, token-mean:
            L_2a = (1/Σ_i|y_i|) Σ_i Σ_t KL(π_T(·|s_it) ‖ π_θ(·|s_it)),  y_i ~ π_T
        --fkl-loss sft: −log π_θ(y_it|s_it) instead, hard-label SFT on the teacher's samples (the paper's
        "teacher-sample SFT" transfer, route R2).
  (S2b) on-policy distillation under student occupancy (Eq. 4; by Eq. 2 RL with the dense reward β·log π_T):
            L_2b = (1/Σ_i|y_i|) Σ_i Σ_t Σ_v π_θ(v|s_it) [log π_θ(v|s_it) − log π_T(v|s_it)],  y_i ~ π_θ
        --opd-loss sampled: the per-token log-ratio as a dense reward, A_t = log π_T(y_t) − log π_θ(y_t), in a
        REINFORCE loss −A_t·π_θ(y_t)/sg(π_θ(y_t)); both have the same expected gradient per position.
  (S3)  student GRPO (as S1) on the labels of --stage3-data.
The teacher is frozen in S2a and S2b; S2a samples it as it goes (the distribution of App. E's cached rollouts).

Data (App. E): a seeded (--split-seed) split of the training set into two equal halves, 1H and 2H; the upstream
stages (1, 2a, 2b) use --upstream-data (1H or full), stage 3 --stage3-data (2H, 1H or full).

Routes (Table 1; T3-*: Table 3's transfer-only rows, unnamed there), one command each:
  R1       cold GRPO on the student           --stages 3 --stage3-data full
  R3-full  full data upstream, no stage 3     --stages 1,2a,2b --upstream-data full
  R5-half  1H upstream, then GRPO on 2H       --stages 1,2a,2b,3 --upstream-data 1H --stage3-data 2H
  R7       R5-half, stage 3 replays 1H        --stages 1,2a,2b,3 --upstream-data 1H --stage3-data 1H
  R2       teacher-sample SFT for the bridge  --stages 1,2a,3 --fkl-loss sft
  R8       OPD without the warmup             --stages 1,2b,3
  R6       an SFT-trained teacher             --stages 2a,2b,3 --teacher SFT_TEACHER
  T3-raw   raw teacher, bridge only           --stages 2a,2b --upstream-data full
  T3-opd   RL'd teacher, OPD only             --stages 1,2b --upstream-data full
  T3-sft   RL'd teacher, SFT only             --stages 1,2a --fkl-loss sft --upstream-data full
R5-half's flags are the defaults. R7 from R5-half's bridge without recomputing it: --stages 3 --stage3-data 1H
--model R5_RUN/stage_2b (every stage seeds its data and rollouts by seed, stage and step, so it is the same run).

Settings (Tables 9, 10; where they are silent, the defaults of verl, the framework both name), and reconstructions:
  1. GRPO stages (Table 9): lr 1e-6, clip 0.2, k3 KL with β = 5e-4 to a frozen copy of the stage's initial policy
     (the estimator is unstated: k3 is verl's "low_var_kl", its GRPO choice, and DeepSeekMath's; the copy is loaded
     only when β > 0), gradient clip 1.0, 3,072 / 16,384 prompt / response tokens, micro-batch 1; verl's dual clip
     c = 3 on negative advantages, token-mean, weight decay 0.01; G = 8 (Table 9 gives no group size; Table 10's).
     Stage 1's settings are not given: it uses Table 9's (--teacher-lr 1e-6).
  2. "GRPO epochs 10, mini-batch 8" (Table 9) is read as 10 passes over the stage's labels (verl's total_epochs)
     in optimizer steps of 8 prompts × G, each on its own rollout batch (no rollout batch is given: on-policy).
     Not implemented: verl's ppo_epochs reading (10 update passes over each rollout batch, in mini-batches of 8
     prompts); mini-batches alone are --prompts-per-step 512 --num-minibatches 64. A stage runs --steps-<s> steps,
     or where that is 0 (the default) --grpo-epochs / --distill-epochs passes over its data, rounded.
  3. Distillation stages (Table 10): lr 1e-6, 64 prompts × 8 rollouts per optimizer step, one pass, 2,048 / 16,384
     tokens, T / top-p / top-k 1 / 1 / off; S2a uses them too (the table does not tell the warmup from OPD). Its
     micro-batch 4 (Table 9's 1 is used) changes speed only: the losses are global token-means.
  4. The authors' public training scripts differ (GRPO clip 0.2/0.28, dual clip 10, no KL, weight decay 0.1, 2,048 /
     8,192 tokens, 512 prompts × 8 in 4 mini-batches; OPD 256 prompts × 1; 400 / 200 / 800 / 100 steps):
     --preset authors-code.
  5. Data: the deduplicated DAPO-Math-17k (open-r1's processing of it); its "Answer:" instructions are stripped
     and the prompt asks for \\boxed{} as in the authors' pipeline; Qwen3 in non-thinking mode. The reward is
     math-verify accuracy on the last \\boxed{} (the authors use a Hendrycks string match, slightly stricter).
  6. Evaluation avg@16 at T 0.7, top-p 0.8, top-k 20 (Qwen3's non-thinking setting, the authors' eval script), up
     to 16,384 tokens, on MATH-500 and AIME 2024/2025, after every stage (the paper's ±: standard error over problems).
Deviations: the distillation losses are token-means over the global batch (the authors average per-micro-batch
token-means), so the result does not depend on how a batch is cut into micro-batches or ranks.

Rollout engines. One model generates in each stage (the teacher in S1 and S2a, the student in S2b and S3), and one
vLLM engine per process (each reserves its own memory) serves it: with `--rollout vllm` run `--stages 1,2a`, then
`--stages 2b,3` with `--teacher`/`--model` at the first run's stage folders (a mix is refused with that advice). A
model that only needs evaluation there (the student after S2a) is sampled by the HF engine.

Tiny preset: the paper's settings at toy scale: tiny:large teaches tiny:small; 10/10/10/20 steps for S1/S2a/S2b/S3
(S3 longer, so GRPO has room to move after distillation), GRPO 16 prompts × 8, distillation 4 prompts × 8, lr 1e-4
(the toy world's working RL rate), the teacher's 3e-5 (tiny:large lost held-out accuracy at 1e-4 in codistill_grpo.py).

Run:
    torchrun --nproc_per_node 8 sparse_to_dense.py --rollout vllm --stages 1,2a --output-dir runs/s2d-t
    torchrun --nproc_per_node 8 sparse_to_dense.py --rollout vllm --stages 2b,3 --output-dir runs/s2d-s \\
        --teacher runs/s2d-t/stage_1 --model runs/s2d-t/stage_2a       # R5-half, Qwen3-8B -> Qwen3-1.7B, 8 GPUs
    python sparse_to_dense.py --preset 1gpu                              # one 80 GB GPU, Qwen3-1.7B -> 0.6B
    python sparse_to_dense.py --preset tiny                              # CPU, toy world, a few minutes
"""

import functools
import gc
import json
import os
import shutil
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
    preset: str = arg("paper", "defaults: paper | authors-code | 1gpu | tiny (CPU toy world); explicit flags win")
    output_dir: str = arg("", "run directory (default runs/<script>-<preset>-<time>)")
    resume: str = arg("", "continue a run: its directory (completed stages and latest checkpoint) or a "
                          "checkpoints/step_N folder")
    overwrite: bool = arg(False, "empty an --output-dir that holds a run (otherwise such a directory is refused)")
    seed: int = arg(0, "seed for model init, data order and rollouts")
    # --- policy and data -------------------------------------------------------------------------------
    model: str = arg("Qwen/Qwen3-1.7B", "student (trained in 2a, 2b, 3): hub name, folder (e.g. another run's "
                     "stage_2a/), tiny:small; the first student stage starts from it")
    train_data: str = arg("open-r1/DAPO-Math-17k-Processed:all", "hub dataset, .jsonl file, or tiny:<families>")
    train_split: str = arg("train", "split of --train-data")
    problem_key: str = arg("prompt", "column holding the problem text")
    answer_key: str = arg("solution", "column holding the gold answer")
    prompt_template: str = arg("{problem}\n\nLet's think step by step and output the final answer within \\boxed{}.",
                               "user message; {problem} is filled in")
    answer_format: Literal["boxed", "answer_tag"] = arg("boxed", "where the final answer is read from")
    max_prompt_tokens: int = arg(3072, "GRPO and evaluation prompts are left-truncated to this many tokens (Table 9)")
    # --- evaluation ------------------------------------------------------------------------------------
    eval_data: str = arg("math500,aime24,aime25", "comma-separated benchmarks (names, .jsonl paths, tiny_<family>)")
    eval_data_dir: str = arg("", "folder with <benchmark>.jsonl files, used before the hub")
    eval_limit: int = arg(0, "evaluate on the first N problems of each benchmark (0 = all)")
    eval_every: int = arg(50, "evaluate every N steps of a stage and the initial models; 0 = only at stage ends")
    eval_samples: int = arg(16, "samples per problem: avg@n, pass@k, maj@n")
    eval_temperature: float = arg(0.7, "evaluation sampling temperature")
    eval_top_p: float = arg(0.8, "evaluation top-p")
    eval_top_k: int = arg(20, "evaluation top-k (0 = off)")
    eval_max_new_tokens: int = arg(16384, "evaluation response budget")
    # --- rollouts --------------------------------------------------------------------------------------
    steps_1: int = arg(0, "stage 1 (teacher GRPO) optimizer steps; 0 = --grpo-epochs passes over its data")
    steps_2a: int = arg(0, "stage 2a (forward-KL warmup) optimizer steps; 0 = --distill-epochs passes over its data")
    steps_2b: int = arg(0, "stage 2b (on-policy distillation) optimizer steps; 0 = --distill-epochs passes")
    steps_3: int = arg(0, "stage 3 (student GRPO) optimizer steps; 0 = --grpo-epochs passes over its data")
    prompts_per_step: int = arg(8, "P: prompts per GRPO rollout batch (stages 1, 3) over all ranks (Table 9)")
    group_size: int = arg(8, "G: completions per prompt in GRPO stages")
    max_new_tokens: int = arg(16384, "response budget in training (Tables 9, 10)")
    temperature: float = arg(1.0, "rollout temperature")
    top_p: float = arg(1.0, "rollout top-p")
    top_k: int = arg(0, "rollout top-k (0 = off)")
    rollout: Literal["hf", "vllm"] = arg("hf", "rollout engine: vllm (colocated, GPU or CPU) or hf (any device)")
    rollout_batch_size: int = arg(256, "hf engine: sequences generated at once")
    vllm_gpu_memory_utilization: float = arg(0.3, "vllm engine: its share of GPU memory")
    vllm_sleep_level: int = arg(2, "vllm engine: 1 offloads weights to CPU while training, 2 discards them (GPU)")
    vllm_kv_cache_gib: float = arg(0.0, "vllm engine: KV-cache GiB (0 = on GPUs from the memory share, on CPUs 1)")
    # --- optimisation ----------------------------------------------------------------------------------
    lr: float = arg(1e-6, "AdamW learning rate of the student (stages 2a, 2b, 3)")
    lr_warmup_steps: int = arg(0, "linear warmup steps at the start of every stage")
    weight_decay: float = arg(0.01, "AdamW weight decay (verl's default; the tables give none)")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    micro_batch_size: int = arg(1, "sequences per forward/backward")
    num_minibatches: int = arg(1, "optimizer steps per rollout batch in GRPO stages (distillation: always 1)")
    clip_low: float = arg(0.2, "PPO clip ε_low")
    clip_high: float = arg(0.2, "PPO clip ε_high")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = arg("token-mean",
                                                                                            "loss aggregation")
    adv_scale: Literal["std", "none"] = arg("std", "group advantage: std-normalised (GRPO) or none (Dr. GRPO)")
    grad_checkpointing: bool = arg(True, "activation checkpointing of decoder layers (CUDA only)")
    logprob_chunk: int = arg(512, "tokens per chunk of LM head + log-softmax")
    # --- bookkeeping -----------------------------------------------------------------------------------
    save_every: int = arg(50, "checkpoint every N steps of a stage (0 = never; stage outputs are always saved)")
    keep_checkpoints: int = arg(2, "checkpoints kept on disk")
    log_samples: int = arg(2, "rollouts per rank written to samples.jsonl each step")
    report_to: Literal["none", "wandb", "tensorboard"] = arg("none", "also log metrics, evaluations and the config to W&B or TensorBoard")
    grader_workers: int = arg(2, "math-verify worker processes per rank")
    grader_timeout: float = arg(5.0, "seconds per answer before it scores 0")
    # --- Sparse-to-Dense -------------------------------------------------------------------------------------
    stages: str = arg("1,2a,2b,3", "stages to run, in order: any subset of 1,2a,2b,3 (the docstring's routes)")
    upstream_data: Literal["1H", "full"] = arg("1H", "labels of stages 1, 2a, 2b: the first half or all (App. E)")
    stage3_data: Literal["2H", "1H", "full"] = arg("2H", "labels of stage 3: the held-out half (R5-half), the "
                                                   "upstream half again (R7 replay control), or all (R1 cold GRPO)")
    split_seed: int = arg(42, "seed of the split into halves")
    teacher: str = arg("Qwen/Qwen3-8B", "teacher sharing the student's tokenizer: stage 1 starts from it; without "
                       "stage 1 it is the distillation target as is (e.g. another run's stage_1/)")
    allow_template_mismatch: bool = arg(False, "accept a teacher whose chat template differs from the student's")
    teacher_lr: float = arg(1e-6, "AdamW learning rate of the teacher in stage 1")
    kl_coef: float = arg(5e-4, "β of the k3 KL to the GRPO stage's initial policy (Table 9); 0 loads no reference")
    dual_clip: float = arg(3.0, "dual-clip c: a negative-advantage token's loss is at most c·|A| (0 = off)")
    grpo_epochs: float = arg(10.0, "passes over the data of a GRPO stage whose --steps-<s> is 0 (Table 9)")
    distill_epochs: float = arg(1.0, "passes over the data of a distillation stage whose --steps-<s> is 0 (Table 10)")
    distill_prompts_per_step: int = arg(64, "prompts per step of stages 2a and 2b over all ranks (Table 10)")
    distill_group_size: int = arg(8, "rollouts per prompt in stages 2a and 2b (Table 10)")
    distill_max_prompt_tokens: int = arg(2048, "prompt truncation in 2a and 2b (Table 10; ≤ --max-prompt-tokens)")
    fkl_loss: Literal["full", "sft"] = arg("full", "stage 2a: exact full-vocabulary KL(π_T‖π_θ) on teacher rollouts, "
                                           "or sft = hard-label SFT on the teacher's samples (route R2)")
    opd_loss: Literal["full", "sampled"] = arg("full", "stage 2b: exact full-vocabulary KL(π_θ‖π_T) per position, "
                                               "or sampled = log π_T − log π_θ of the sampled token as its advantage")
    enable_thinking: bool = arg(False, "passed to the chat template (Qwen3: false = non-thinking mode, the paper's)")


PRESETS = {
    "paper": {},  # Tables 9 and 10, see the docstring
    "authors-code": dict(max_prompt_tokens=2048, distill_max_prompt_tokens=2048, max_new_tokens=8192,
                         steps_1=400, steps_2a=200, steps_2b=800, steps_3=100, grpo_epochs=0, distill_epochs=0,
                         prompts_per_step=512, num_minibatches=4, micro_batch_size=8, clip_high=0.28, dual_clip=10.0,
                         kl_coef=0.0, weight_decay=0.1, distill_prompts_per_step=256, distill_group_size=1),
    "1gpu": dict(model="Qwen/Qwen3-0.6B", teacher="Qwen/Qwen3-1.7B", distill_prompts_per_step=8,
                 max_new_tokens=2048, eval_max_new_tokens=4096, max_prompt_tokens=512, distill_max_prompt_tokens=512,
                 eval_samples=4, micro_batch_size=4, steps_1=100, steps_2a=50, steps_2b=100, steps_3=50,
                 grpo_epochs=0, distill_epochs=0, eval_every=0),
    "tiny": dict(model="tiny:small", teacher="tiny:large", train_data="tiny:add,mul,lin", problem_key="problem",
                 answer_key="answer", prompt_template="{problem}", max_prompt_tokens=64, distill_max_prompt_tokens=64,
                 eval_data="tiny_add,tiny_mul,tiny_lin", eval_limit=128, eval_every=10, eval_samples=4,
                 eval_temperature=1.0, eval_top_p=1.0, eval_top_k=0, eval_max_new_tokens=48, steps_1=10,
                 steps_2a=10, steps_2b=10, steps_3=20, grpo_epochs=0, distill_epochs=0, prompts_per_step=16,
                 distill_prompts_per_step=4, max_new_tokens=48, lr=1e-4, teacher_lr=3e-5, micro_batch_size=64,
                 save_every=10, grader_workers=1, logprob_chunk=4096),
}

STAGES = ("1", "2a", "2b", "3")
TRAINS = {"1": "teacher", "2a": "student", "2b": "student", "3": "student"}      # the model a stage updates
GENERATES = {"1": "teacher", "2a": "teacher", "2b": "student", "3": "student"}   # the model that samples its data
GRPO_STAGES = ("1", "3")


# ----------------------------------------------------------------------------------------------------------
# The method: the stages' objectives (S1-S3 in the docstring) and the split into halves
# ----------------------------------------------------------------------------------------------------------
def grpo_loss(logp_BT, old_logp_BT, ref_logp_BT, adv_B, mask_BT, norm, args: Args):
    """(S1), (S3): clipped surrogate with the dual clip, token-mean, plus β·k3 to the reference where there is one.
    Returns (loss, surrogate, k3 map or None, clipped-low map, clipped-high map)."""
    adv_BT = adv_B[:, None].expand_as(logp_BT)
    pg_BT, low_BT, high_BT = common.ppo_clip_loss(logp_BT, old_logp_BT, adv_BT, args.clip_low, args.clip_high)
    if args.dual_clip > 0:  # a huge ratio on a bad token would otherwise give an unbounded step
        pg_BT = torch.where(adv_BT < 0, torch.minimum(pg_BT, -args.dual_clip * adv_BT), pg_BT)
    loss_pg = common.agg_loss(pg_BT, mask_BT, args.loss_agg, norm)
    if ref_logp_BT is None:
        return loss_pg, loss_pg, None, low_BT, high_BT
    kl_BT = common.kl_estimate(logp_BT, ref_logp_BT, "k3")  # exp(lp_ref − lp) − (lp_ref − lp) − 1
    loss = loss_pg + args.kl_coef * common.agg_loss(kl_BT, mask_BT, args.loss_agg, norm)
    return loss, loss_pg, kl_BT, low_BT, high_BT


def fkl_token_loss(h_NH, head, h_t_NH, head_t, targets_N, vocab: int, args: Args) -> torch.Tensor:
    """(S2a) per teacher-sampled token [N]: KL(π_T(·|s_t) ‖ π_θ(·|s_t)) over the shared vocabulary (`full`), or
    −log π_θ(y_t|s_t) (`sft`: hard labels, the sampled-token estimator of the same gradient)."""
    if args.fkl_loss == "full":
        return common.kl_from_hidden(h_NH, head, h_t_NH, head_t, vocab, "forward", args.logprob_chunk)
    return -common.logprobs_from_hidden(h_NH, head, targets_N, vocab, 1.0, args.logprob_chunk, False)[0]


def opd_token_loss(h_NH, head, h_t_NH, head_t, targets_N, vocab: int, args: Args) -> torch.Tensor:
    """(S2b) per student-sampled token [N]: Σ_v π_θ(v)(log π_θ(v) − log π_T(v)) (`full`), or the dense implicit
    reward A_t = log π_T(y_t) − log π_θ(y_t) in an on-policy REINFORCE loss (`sampled`). Both values are the
    token's reverse-KL estimate (exact / single-sample k1), and both gradients agree in expectation over y_t."""
    if args.opd_loss == "full":
        return common.kl_from_hidden(h_NH, head, h_t_NH, head_t, vocab, "reverse", args.logprob_chunk)
    logp_N, _ = common.logprobs_from_hidden(h_NH, head, targets_N, vocab, 1.0, args.logprob_chunk, False)
    with torch.no_grad():
        t_logp_N, _ = common.logprobs_from_hidden(h_t_NH, head_t, targets_N, vocab, 1.0, args.logprob_chunk, False)
    adv_N = (t_logp_N - logp_N).detach()
    return -adv_N * torch.exp(logp_N - logp_N.detach())  # ratio 1 on-policy; its value is −A_t = k1


def split_halves(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """(1H, 2H): a seeded split into two equal halves (App. E; 1H gets an odd row), each in the original order."""
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    second = set(perm[(len(rows) + 1) // 2:])
    return [r for i, r in enumerate(rows) if i not in second], [r for i, r in enumerate(rows) if i in second]


def parse_stages(spec: str) -> list[str]:
    stages = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages or len(set(stages)) != len(stages) or stages != sorted(stages, key=STAGES.index):
        raise ValueError(f"--stages {spec!r}: give distinct stages from {', '.join(STAGES)} in that order "
                         f"(e.g. 1,2a,2b,3 or 2b,3)")
    return stages


# ----------------------------------------------------------------------------------------------------------
# Train loop: one stage at a time, each reading the previous stage's HF output
# ----------------------------------------------------------------------------------------------------------
def grpo_update(model, ref, opt, batch, correct_B, engine_logp_BT, vocab: int, args: Args, meter) -> None:
    """One GRPO rollout batch: group advantages, old log-probs (off-policy mini-batches only) and the reference's
    (when β > 0), clipped updates."""
    correct_PG = correct_B.view(-1, args.group_size)
    adv_B = common.group_advantages(correct_PG, args.adv_scale).view(-1).to(batch.ids_BT.device)
    updates = runtime.minibatches(batch, args.micro_batch_size, args.num_minibatches)
    old_logp_BT = common.score_logprobs(model, batch, vocab, args.temperature, args.micro_batch_size,
                                        args.logprob_chunk) if len(updates) > 1 else None
    ref_logp_BT = None
    if ref is not None:
        with meter.time("ref"):
            ref_logp_BT = runtime.score(ref, batch, vocab, args.temperature, args.micro_batch_size,
                                        args.logprob_chunk)  # the frozen reference's root released
    for update in updates:
        for rows, mb, norm in runtime.accumulate(update, args.max_new_tokens):
            logp_BT, ent_BT = common.token_logprobs(model, mb, vocab, args.temperature, args.logprob_chunk)
            old_BT = logp_BT.detach() if old_logp_BT is None else old_logp_BT[rows, :mb.T]
            ref_BT = None if ref_logp_BT is None else ref_logp_BT[rows, :mb.T]
            loss, loss_pg, kl_BT, low_BT, high_BT = grpo_loss(logp_BT, old_BT, ref_BT, adv_B[rows], mb.mask_BT, norm,
                                                              args)
            loss.backward()
            with torch.no_grad():
                m, diff_BT = mb.mask_BT, (old_BT - engine_logp_BT[rows, :mb.T]).abs() * mb.mask_BT
                meter.add({"loss/pg": loss_pg}, divide_by=len(updates))
                meter.tokens({"policy/entropy": ent_BT * m, "policy/clip_low": low_BT * m,
                              "policy/clip_high": high_BT * m, "sampling/logp_diff_mean": diff_BT})
                meter.max({"sampling/logp_diff_max/max": diff_BT})
                if kl_BT is not None:
                    meter.tokens({"kl/ref": kl_BT * m})
        runtime.optimizer_step(model, opt, args.max_grad_norm, meter)
    meter.set({"reward/frac_zero_std": (correct_PG.std(1) == 0).float().mean()})


def distill_update(stage: str, student, teacher, opt, batch, engine_logp_BT, vocab: int, args: Args, meter) -> None:
    """One distillation step (S2a or S2b): the teacher's full next-token distributions at the rollout's
    positions, the student's token loss, one optimizer step (timing the teacher's forward apart)."""
    key = "kl/forward" if stage == "2a" else "kl/reverse"
    (update,) = runtime.minibatches(batch, args.micro_batch_size, 1)
    for rows, mb, norm in runtime.accumulate(update, args.max_new_tokens):
        h_NH, targets_N = common.response_hidden(student, mb), common.response_targets(mb)
        h_t_NH = None
        if not (stage == "2a" and args.fkl_loss == "sft"):  # hard-label SFT needs no teacher forward
            with meter.time("teacher"), torch.no_grad():
                h_t_NH = common.response_hidden(teacher, mb)
        head, head_t = student.get_output_embeddings(), teacher.get_output_embeddings()
        token_loss = fkl_token_loss if stage == "2a" else opd_token_loss
        loss_N = token_loss(h_NH, head, h_t_NH, head_t, targets_N, vocab, args)
        loss = common.agg_loss(common.to_grid(loss_N, mb), mb.mask_BT, args.loss_agg, norm)
        loss.backward()
        runtime.release(teacher)  # its head was read for the last time in this backward (FSDP2 would keep it gathered)
        with torch.no_grad():
            meter.add({"loss/fkl" if stage == "2a" else "loss/opd": loss})
            kl = loss_N.sum().double()
            if stage == "2a" and args.fkl_loss == "sft":  # sampled estimate: the engine's teacher log-probs
                kl = (engine_logp_BT[rows, :mb.T] * mb.mask_BT).sum().double() + kl
            meter.tokens({key: kl})
    runtime.optimizer_step(student, opt, args.max_grad_norm, meter)


def mark_done(out: Path, stage: str, summary: dict, d) -> None:
    """Write stage_<s>.json atomically, after the stage's model is saved: --resume reads it as a finished stage."""
    if d.main:
        tmp = out / f"stage_{stage}.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, out / f"stage_{stage}.json")
    runtime.barrier()


def resume_point(args: Args, out: Path, stages: list[str]):
    """(number of stages already complete, checkpoint inside the next stage or None) of the run to resume."""
    p = Path(args.resume)
    if (p / "trainer_state.pt").exists():  # an explicit checkpoint: continue from there, redoing later stages
        return stages.index(torch.load(p / "trainer_state.pt", weights_only=True)["stage"]), p
    done = 0
    while done < len(stages) and (out / f"stage_{stages[done]}.json").exists():
        done += 1
    try:
        ckpt = runtime.find_checkpoint(args.resume)
    except FileNotFoundError:
        ckpt = None
    if ckpt is not None and (done == len(stages) or torch.load(ckpt / "trainer_state.pt",
                                                               weights_only=True)["stage"] != stages[done]):
        ckpt = None  # a checkpoint of a stage that has finished since
    if done == 0 and ckpt is None:
        raise FileNotFoundError(f"--resume {args.resume}: no finished stage and no checkpoint there (expected a run "
                                f"directory with stage_<s>.json or checkpoints/step_N/, or a step_N folder)")
    return done, ckpt


def stage_shape(stage: str, args: Args) -> tuple[int, int, float, int]:
    """(prompts per step, rollouts per prompt, passes over the data when --steps-<s> is 0, prompt tokens) of a stage:
    Table 9's for GRPO stages, Table 10's for the distillation ones."""
    if stage in GRPO_STAGES:
        return args.prompts_per_step, args.group_size, args.grpo_epochs, args.max_prompt_tokens
    return args.distill_prompts_per_step, args.distill_group_size, args.distill_epochs, args.distill_max_prompt_tokens


def check_args(args: Args) -> list[str]:
    """The requested stages, or a clear error for a combination that cannot run."""
    stages, world = parse_stages(args.stages), cli.world_size()
    for s in stages:
        n, _, epochs, _ = stage_shape(s, args)
        kind = "" if s in GRPO_STAGES else "distill-"
        if getattr(args, f"steps_{s}") == 0 and not epochs > 0:
            raise ValueError(f"stage {s} has no length: give --steps-{s} N, or --{kind or 'grpo-'}epochs E > 0 passes "
                             f"over its data; leave a stage out of --stages to skip it")
        if n % world:
            raise ValueError(f"--{kind}prompts-per-step {n} does not divide by the world size {world} (WORLD_SIZE): "
                             f"use a multiple of {world}, e.g. --{kind}prompts-per-step {max(world, n - n % world)}, "
                             f"or launch {world} ranks that divide it")
    if args.kl_coef < 0:
        raise ValueError(f"--kl-coef {args.kl_coef}: must be at least 0 (0 = no KL term, no reference model)")
    if args.distill_max_prompt_tokens > args.max_prompt_tokens:
        raise ValueError(f"--distill-max-prompt-tokens {args.distill_max_prompt_tokens} exceeds --max-prompt-tokens "
                         f"{args.max_prompt_tokens}, which sizes the rollout engines: raise the latter")
    if args.rollout == "vllm" and len({GENERATES[s] for s in stages}) > 1:
        raise ValueError(f"--rollout vllm holds one model per process, but --stages {args.stages} samples from both "
                         f"the teacher (1, 2a) and the student (2b, 3). Run --stages 1,2a first, then --stages 2b,3 "
                         f"with --teacher RUN/stage_1 --model RUN/stage_2a, or use --rollout hf")
    return stages


def stage_data(args: Args) -> dict[str, tuple[str, list[dict]]]:
    """Each stage's (data name, problems): --upstream-data for 1, 2a, 2b and --stage3-data for 3, each naming a
    half of the labelled set (1H, 2H) or all of it."""
    rows = common.load_problems(args.train_data, args.train_split, args.problem_key, args.answer_key, seed=args.seed)
    rows = [{**r, "problem": common.strip_dapo_wrapper(r["problem"])} for r in rows]
    first, second = split_halves(rows, args.split_seed)
    pools = {"1H": first, "2H": second, "full": rows}
    return {s: (name, pools[name]) for s, name in (("1", args.upstream_data), ("2a", args.upstream_data),
                                                   ("2b", args.upstream_data), ("3", args.stage3_data))}


def stage_lengths(args: Args, stages: list[str], data: dict) -> dict[str, int]:
    """Optimizer steps per stage: --steps-<s>, or where that is 0, --grpo-epochs / --distill-epochs passes over the
    stage's problems at its prompts per step (Tables 9, 10: 10 and 1; each step is one optimizer step)."""
    steps = {}
    for s in stages:
        per_step, _, epochs, _ = stage_shape(s, args)
        steps[s] = getattr(args, f"steps_{s}") or max(1, round(epochs * len(data[s][1]) / per_step))
    return steps


def stage_models(stage: str, paths: dict[str, str], d, vocab: int, args: Args):
    """The model the stage trains and its frozen partner: the teacher in 2a and 2b (their target, and 2a's sampler),
    in GRPO stages a copy of the stage's initial policy as the KL reference, loaded only when β > 0. The frozen one
    takes no gradients and has no optimizer state."""
    role = TRAINS[stage]
    model = runtime.load_model(paths[role], d, trainable=True, vocab=vocab, grad_ckpt=args.grad_checkpointing)
    frozen = paths["teacher"] if stage in ("2a", "2b") else paths[role] if args.kl_coef > 0 else None
    return model, None if frozen is None else runtime.load_model(frozen, d, trainable=False, vocab=vocab)


def stage_roles(stages: list[str]) -> set[str]:
    """The roles these stages load: the one each stage trains, and the teacher wherever it is distilled (2a, 2b)."""
    return {TRAINS[s] for s in stages} | ({"teacher"} if {"2a", "2b"} & set(stages) else set())


def stage_sources(args: Args, stages: list[str], out: Path) -> dict[str, dict[str, str]]:
    """Where each stage's models start: the flags' models, or the last earlier stage's output for that role."""
    sources, src = {"teacher": args.teacher, "student": args.model}, {}
    for s in stages:
        src[s] = dict(sources)
        sources[TRAINS[s]] = str(out / f"stage_{s}")
    return src


def model_fields(args: Args) -> list[str]:
    """The model flags this run loads: --teacher where a stage trains or samples it, --model where one trains it."""
    roles = stage_roles(parse_stages(args.stages))
    return [f for r, f in (("teacher", "teacher"), ("student", "model")) if r in roles]


def main(args: Args) -> None:
    stages = check_args(args)
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir is not None and (resume_dir / "trainer_state.pt").exists():
        resume_dir = resume_dir.parent.parent
    d, out, _ = runtime.start(args, __file__, run_dir=args.output_dir or (str(resume_dir) if resume_dir else ""))
    done, ckpt = resume_point(args, out, stages) if args.resume else (0, None)

    # --- models and data: each stage reads the previous output of the role it needs ----------------------
    src, roles = stage_sources(args, stages, out), stage_roles(stages)  # src: stage -> {role: where it starts}
    paths = {r: runtime.resolve(p, d) for r, p in (("teacher", args.teacher), ("student", args.model)) if r in roles}
    toks = {r: runtime.load_tokenizer(p) for r, p in paths.items()}
    if len(toks) == 2:
        runtime.check_same_tokenizer(toks["student"], toks["teacher"], "--model", "--teacher",
                                     allow_template_mismatch=args.allow_template_mismatch)
    tok = toks.get("student", toks.get("teacher"))
    # the chat template sees enable_thinking (Qwen3's non-thinking mode); the tokenizers saved with models do not
    tok.apply_chat_template = functools.partial(tok.apply_chat_template, enable_thinking=args.enable_thinking)
    vocab = len(tok)  # logits are sliced to the shared tokenizer: Qwen pads vocab_size differently per size
    grader = verifiers.Grader(args.grader_workers, args.grader_timeout, args.answer_format)
    data = stage_data(args)  # stage -> (1H | 2H | full, problems)
    steps = stage_lengths(args, stages, data)
    offset = {s: sum(steps[x] for x in stages[:i]) for i, s in enumerate(stages)}
    total = sum(steps[s] for s in stages)
    benches = common.load_benchmarks(args.eval_data, args.eval_data_dir, args.eval_limit)
    train_sampling = engines.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    eval_sampling = engines.Sampling(args.eval_max_new_tokens, args.eval_temperature, args.eval_top_p, args.eval_top_k)
    by_role = {}

    def engine(role: str):
        """The role's rollout engine: vLLM for the role that generates in these stages (one per process), the HF
        sampler for the other, which only ever needs evaluation."""
        if role not in by_role:
            kind = args.rollout if role == GENERATES[stages[0]] else "hf"
            by_role[role] = engines.make_engine(kind, paths[role], d, toks[role], vocab, args)
        return by_role[role]

    start = offset[stages[done]] if done < len(stages) else total
    if ckpt is not None:
        start = offset[stages[done]] + torch.load(ckpt / "trainer_state.pt", weights_only=True)["stage_step"]
    log = runtime.RunLog(out, d, args, start, total)
    log.print(f"[sparse_to_dense] {out}  world={d.world}  device={d.device.type}  stages {','.join(stages)}  "
              f"steps {start}->{total}")

    def run_eval(model, role: str, step: int) -> dict:
        engines.sync_weights(model, engine(role))
        res = engines.evaluate(engine(role), tok, benches, grader, args.prompt_template, args.eval_samples,
                               eval_sampling, [1, 4, 8, 16, 32], d, args.seed, args.max_prompt_tokens)
        engine(role).sleep()  # free the GPU for training (vLLM); the next weight push wakes it
        log.eval(step, res, "teacher" if role == "teacher" else "")
        return res

    if start == 0 and args.eval_every:  # the starting points, once: later stages start where earlier ones ended
        for role in sorted({TRAINS[s] for s in stages}, reverse=True):
            run_eval(runtime.load_model(paths[role], d, trainable=False, vocab=vocab), role, 0)

    for si, stage in enumerate(stages):
        if si < done:
            continue
        role, gen_role, n_steps = TRAINS[stage], GENERATES[stage], steps[stage]
        runtime.seed_everything(args.seed)
        model, frozen = stage_models(stage, {r: runtime.resolve(p, d) for r, p in src[stage].items()}, d, vocab, args)
        lr = args.teacher_lr if role == "teacher" else args.lr
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, fused=True)
        per_step, G, _, max_prompt = stage_shape(stage, args)
        data_name, problems = data[stage]
        stream = common.PromptStream(problems, per_step, d.rank, d.world, args.seed * 1000 + STAGES.index(stage))
        first = 0
        if ckpt is not None and si == done:
            state = runtime.load_checkpoint(ckpt, {role: model}, {role: opt}, d)
            stream.load_state_dict(state["data"])
            first = state["stage_step"]
        gen_model, gen_engine = model if gen_role == role else frozen, engine(gen_role)
        log.print(f"[stage {stage}] trains the {role} from {src[stage][role]}; rollouts from the {gen_role}; "
                  f"{data_name}: {len(problems)} problems, {per_step} x {G} per step, steps {first}->{n_steps}"
                  + (f"; {args.fkl_loss} loss" if stage == "2a" else ""))

        for step in range(first, n_steps):
            meter = runtime.Meter()
            lr_now = runtime.set_lr(opt, step, lr, args.lr_warmup_steps)

            # --- weight sync: the engine gets the sampling model's current weights (vLLM discards them in sleep)
            with meter.time("sync"):
                engines.sync_weights(gen_model, gen_engine)

            # --- rollout: from the model that generates in this stage
            with meter.time("rollout"):
                ro = engines.rollout(gen_engine, tok, stream.next(), G, args.prompt_template, max_prompt,
                                     train_sampling, runtime.rollout_seed(args.seed, step, d.rank,
                                                                          salt=STAGES.index(stage) + 1))
                gen_engine.sleep()  # free the GPU for the update (vLLM); the next weight push wakes it

            # --- reward: verifier accuracy (the GRPO signal in 1 and 3; only a metric in 2a and 2b)
            with meter.time("reward"):
                correct_B = torch.tensor(grader(ro.texts, ro.answers))

            # --- logprobs -> loss -> step
            batch = ro.batch(tok.pad_token_id, d.device)
            engine_logp_BT = ro.engine_logprobs(batch.T, d.device)
            with meter.time("update"):
                if stage in GRPO_STAGES:
                    grpo_update(model, frozen, opt, batch, correct_B, engine_logp_BT, vocab, args, meter)
                else:
                    distill_update(stage, model, frozen, opt, batch, engine_logp_BT, vocab, args, meter)

            # --- log
            meter.set({"reward/mean": correct_B.mean(), "lr": lr_now, "reward/grader_failures": grader.take_failures()})
            metrics = meter.read(batch.mask_BT.sum()) | ro.stats()
            metrics["timing_s/update"] -= metrics.get("timing_s/teacher", 0.0) + metrics.get("timing_s/ref", 0.0)
            metrics["perf/tokens_per_s"] = ro.num_tokens / metrics["timing_s/step"]
            gstep = offset[stage] + step + 1
            log.metrics(gstep, {"stage": stage, "stage_step": step + 1, **runtime.all_reduce_mean(metrics, d)},
                        show=("reward/mean", "kl/forward", "kl/reverse", "kl/ref"))
            log.samples(gstep, [{"stage": stage, **r} for r in ro.samples(correct_B.tolist(), args.log_samples)])

            # --- eval, then checkpoint (so that a checkpoint implies its step's eval is logged)
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < n_steps:
                run_eval(model, role, gstep)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < n_steps:
                runtime.save_checkpoint(out, gstep, {role: model}, {role: opt},
                                        {"data": stream.state_dict(), "stage": stage, "stage_step": step + 1},
                                        d, args.keep_checkpoints)

        # --- end of stage: evaluate, write the HF model the next stage reads, then mark the stage done
        res = run_eval(model, role, offset[stage] + n_steps)
        runtime.save_hf(model, toks[role], out / f"stage_{stage}", d)
        mark_done(out, stage, {"stage": stage, "trained": role, "init": src[stage][role], "rollouts_from": gen_role,
                               "data": data_name, "problems": len(problems),
                               "loss": args.fkl_loss if stage == "2a" else args.opd_loss if stage == "2b" else None,
                               "teacher": src[stage]["teacher"] if stage in ("2a", "2b") else None,
                               "reference": src[stage][role] if frozen is not None and stage in GRPO_STAGES else None,
                               "steps": [offset[stage], offset[stage] + n_steps],
                               "output": str(out / f"stage_{stage}"), "eval": res}, d)
        ckpt = None
        del model, frozen, opt
        gc.collect()
        if d.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- final: the last stage's model is the run's product
    if d.main:
        shutil.rmtree(out / "final", ignore_errors=True)
        shutil.copytree(out / f"stage_{stages[-1]}", out / "final")
    runtime.barrier()
    log.close(("reward/mean", "kl/forward", "kl/reverse", "response/mean_length"))
    grader.close()
    log.print(f"[sparse_to_dense] done: {out}")
    runtime.finish()


if __name__ == "__main__":
    main(cli.parse_args(Args, PRESETS, check=check_args, models=model_fields, per_step=()))
