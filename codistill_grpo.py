"""CoDistill-GRPO: A Co-Distillation Recipe for Efficient Group Relative Policy Optimization
(Kwon, Sun, Suresh, Jain, Kumar; arXiv 2605.08873).

A small and a large model train together on the same rollouts, which only the small model generates. Each step,
both models score those rollouts with their pre-update weights (π_S_old, π_L_old), then both update:

  (1) d_i,t = clamp(log π_L_old(y_i,t) − log π_S_old(y_i,t), −c, c)             per-token KD signal
  (2) small: R_i = acc_i + fmt_i + λ·mean_t d_i,t,  Â_i = (R_i − mean_G R)/(std_G R + ε)   on-policy KD reward
  (3) small: J_S = token-mean min(ρ Â, clip(ρ, 1−ε_low, 1+ε_high) Â),  ρ = π_S/π_S_old
  (4) large: w_i,t = sg[min(π_L_old(y_i,t)/π_S_old(y_i,t), C)]                     truncated importance weights
  (5) large: J_L = token-mean w · min(ρ Â^L, clip(ρ) Â^L),  ρ = π_L/π_L_old,  Â^L from acc + fmt only

The paper's full text was not available: equations (1)-(5) are our numbering of a reconstruction from its abstract
and third-party citations of its appendix. Reconstructions:
  1. The KD reward is the sequence mean of the clamped log-ratio, added to the task reward before group
     normalisation (the "combined accuracy + KD score"); --kd-level token adds λ·d_i,t to the advantage instead.
     λ (--kd-coef) and c (--kd-clip) are not published: 0.1 and 5.
  2. The large model's weights are token-level, truncated at C = 2 (decoupled PPO: the ratio inside the clip is
     relative to π_L_old, the weight corrects from the small model's sampling to π_L_old); --large-is none
     (the workshop version's wording), token_mask (drop tokens outside [1/C, C], kept in the token-mean
     denominator), seq_snis (per-sequence exp Σ_t log(π_L_old/π_S_old), normalised to mean 1 within the group,
     then truncated at C).
  3. The large model's reward has no KD term. Both updates use the pre-update snapshots of both models, so their
     order does not matter; the small model's rollout engine is refreshed after each update.
  4. Data: MATH train as PrimeIntellect/Hendrycks-Math (7,474 of the 7,500 problems, with a final-answer
     column); 8 epochs of 32 prompts × 8 = 1,864 steps. Rollouts at T 1.0 / top-p 0.95, max response 3,072;
     learning rate 1e-6 for both models; no reference KL; clip 0.2; greedy evaluation on Minerva, MATH-500,
     AMC 23 (the paper's "AMC" set is not identified) and OlympiadBench, with the training template.
  5. The R1-Zero template (DeepSeek-R1, Table 1) is raw prompt text ending in "Assistant:", the problem on its own
     line (no chat markup: the models are base models); the answer is read from the last <answer> tag, and the
     format reward is 0.25 for each of </think> and </answer> that occurs exactly once (reward at most 1.5).
  6. Not implemented: the "down-sampling on a combined accuracy + KD score" that one third-party summary
     mentions; its placement and rule are unknown.
Deviations: the trainer's log-probs are those of the temperature-scaled distribution, without top-p truncation
(as verl's rollout correction does), so with top-p 0.95 π_S_old in (1) and (4) is the untruncated small model.
Evaluating the large model (--eval-large) is an addition: the paper compares it with standard GRPO.
Tiny preset: the toy models only know the "{problem}" prompt (through the chat template) and \\boxed{} answers,
not the R1-Zero tags, so there the answer is the last \\boxed{} and the format reward is off (--format-reward 0).
The tiny large model's learning rate, 3e-5, was measured: at 1e-4 its held-out accuracy fell from 0.735 to 0.671
in 40 steps, at 3e-5 it held (0.729); the small model's 1e-4 is the toy world's working RL rate.

Flags that give the paper's baselines:
    --kd-coef 0                  the small model is plain GRPO (the large model still trains on its rollouts)
    --train-large false          frozen-oracle KD: the small model learns from a fixed large model
    --large-rollout-frac 1       the large model samples its own groups (standard GRPO for it; a fraction gives a
                                 mixed group); timing_s/large_step against --large-rollout-frac 0 is the paper's
                                 "about 18% faster". With --rollout vllm the small model holds the one vLLM engine a
                                 process may have, and the large model samples with the HF engine (slower): for a
                                 vLLM-timed standard-GRPO step of the large model, time it alone with kdrl.py
                                 --model <large> --teacher none --kd-coef 0 --rollout vllm. bench/codistill_speed.py
                                 times both large-model steps in one process.
The no-grad scoring pass of the large model gives the KD reward and its old log-probs before either update; at one
optimizer step per batch it could be folded into the forward of its update (token-level weights only): not done,
for clarity.

Run:
    torchrun --nproc_per_node 8 codistill_grpo.py --rollout vllm     # Qwen2.5-Math-1.5B + 7B, 8 GPUs
    python codistill_grpo.py --preset 1gpu --rollout vllm            # one 80 GB GPU, Qwen2.5-0.5B + 1.5B
    python codistill_grpo.py --preset tiny                           # CPU, toy world, ~2 minutes
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import cli
import common
import engines
import runtime
import verifiers
from cli import arg

R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
           "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
           "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
           "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
           "User: {problem}\nAssistant:")


@dataclass
class Args:
    # --- run -------------------------------------------------------------------------------------------
    preset: str = arg("paper", "bundle of defaults: paper | 1gpu | tiny (CPU toy world); explicit flags win")
    output_dir: str = arg("", "run directory (default runs/<script>-<preset>-<time>)")
    resume: str = arg("", "continue a run: its directory (latest checkpoint) or a checkpoints/step_N folder")
    overwrite: bool = arg(False, "empty an --output-dir that holds a run (otherwise such a directory is refused)")
    seed: int = arg(0, "seed for model init, data order and rollouts")
    # --- policy and data -------------------------------------------------------------------------------
    model: str = arg("Qwen/Qwen2.5-Math-1.5B", "small model (trained; generates the rollouts): hub name, folder, "
                     "tiny:small")
    train_data: str = arg("PrimeIntellect/Hendrycks-Math", "hub dataset, .jsonl file, or tiny:<families>")
    train_split: str = arg("train", "split of --train-data")
    problem_key: str = arg("question", "column holding the problem text")
    answer_key: str = arg("answer", "column holding the gold answer")
    prompt_template: str = arg(R1_ZERO, "prompt; {problem} is filled in (see --chat-template)")
    answer_format: Literal["boxed", "answer_tag"] = arg("answer_tag", "where the final answer is read from")
    max_prompt_tokens: int = arg(1024, "prompts are left-truncated to this many tokens")
    # --- evaluation ------------------------------------------------------------------------------------
    eval_data: str = arg("minerva_math,math500,amc23,olympiadbench",
                         "comma-separated benchmarks (names, .jsonl paths, tiny_<family>)")
    eval_data_dir: str = arg("", "folder with <benchmark>.jsonl files, used before the hub")
    eval_limit: int = arg(0, "evaluate on the first N problems of each benchmark (0 = all)")
    eval_every: int = arg(100, "evaluate every N steps (and at the start and end); 0 = only at the end")
    eval_samples: int = arg(1, "samples per problem: avg@n, pass@k, maj@n")
    eval_temperature: float = arg(0.0, "evaluation sampling temperature")
    eval_top_p: float = arg(1.0, "evaluation top-p")
    eval_top_k: int = arg(0, "evaluation top-k (0 = off)")
    eval_max_new_tokens: int = arg(3072, "evaluation response budget")
    # --- rollouts --------------------------------------------------------------------------------------
    total_steps: int = arg(1864, "optimizer steps per model (one rollout batch each when --num-minibatches 1)")
    prompts_per_step: int = arg(32, "P: prompts per step over all ranks")
    group_size: int = arg(8, "G: completions per prompt")
    max_new_tokens: int = arg(3072, "response budget in training")
    temperature: float = arg(1.0, "rollout temperature")
    top_p: float = arg(0.95, "rollout top-p")
    top_k: int = arg(0, "rollout top-k (0 = off)")
    rollout: Literal["hf", "vllm"] = arg("hf", "small model's rollout engine: vllm (colocated, GPU or CPU) or hf (any device)")
    rollout_batch_size: int = arg(256, "hf engine: sequences generated at once")
    vllm_gpu_memory_utilization: float = arg(0.3, "vllm engine: its share of GPU memory")
    vllm_sleep_level: int = arg(2, "vllm engine: 1 offloads weights to CPU while training, 2 discards them (GPU)")
    vllm_kv_cache_gib: float = arg(0.0, "vllm engine: KV-cache GiB (0 = on GPUs from the memory share, on CPUs 1)")
    # --- optimisation ----------------------------------------------------------------------------------
    lr: float = arg(1e-6, "AdamW learning rate of the small model (--large-lr: the large model's)")
    lr_warmup_steps: int = arg(0, "linear warmup steps")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    micro_batch_size: int = arg(8, "sequences per forward/backward")
    num_minibatches: int = arg(1, "optimizer steps per rollout batch (1 = on-policy, as in the paper)")
    clip_low: float = arg(0.2, "PPO clip ε_low")
    clip_high: float = arg(0.2, "PPO clip ε_high")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = arg("token-mean",
                                                                                            "loss aggregation")
    adv_scale: Literal["std", "none"] = arg("std", "group advantage: std-normalised (GRPO) or none (Dr. GRPO)")
    grad_checkpointing: bool = arg(True, "activation checkpointing of decoder layers (CUDA only)")
    logprob_chunk: int = arg(1024, "tokens per chunk of LM head + log-softmax")
    # --- bookkeeping -----------------------------------------------------------------------------------
    save_every: int = arg(100, "checkpoint every N steps (0 = never)")
    keep_checkpoints: int = arg(2, "checkpoints kept on disk")
    log_samples: int = arg(2, "rollouts per rank written to samples.jsonl each step")
    report_to: Literal["none", "wandb", "tensorboard"] = arg("none", "also log metrics, evaluations and the config to W&B or TensorBoard")
    grader_workers: int = arg(2, "math-verify worker processes per rank")
    grader_timeout: float = arg(5.0, "seconds per answer before it scores 0")
    # --- CoDistill-GRPO ------------------------------------------------------------------------------------
    large_model: str = arg("Qwen/Qwen2.5-Math-7B", "large model, sharing the small model's tokenizer: hub name, "
                           "folder, tiny:large")
    allow_template_mismatch: bool = arg(False, "accept a large model whose chat template differs from the "
                                        "small model's (it would score prompts in the small model's format)")
    train_large: bool = arg(True, "train the large model (false: the frozen-oracle KD baseline)")
    large_lr: float = arg(1e-6, "AdamW learning rate of the large model")
    kd_coef: float = arg(0.1, "λ: weight of the KD reward (Eq. 2); 0 = plain GRPO for the small model")
    kd_level: Literal["seq_mean", "token"] = arg("seq_mean", "KD reward: sequence mean of d added to the reward before "
                                                 "normalisation (Eq. 2), or λ·d_t added to each token's advantage")
    kd_clip: float = arg(5.0, "c: the per-token log-ratio d is clamped to [−c, c] (Eq. 1)")
    large_is: Literal["token_tis", "none", "token_mask", "seq_snis"] = arg(
        "token_tis", "importance weights of the large model on the small model's tokens (Eq. 4), see the docstring")
    is_cap: float = arg(2.0, "C: truncation of the importance weights (token_mask keeps ratios in [1/C, C])")
    large_rollout_frac: float = arg(0.0, "share of each group the large model samples itself: 0 = CoDistill, "
                                    "1 = standard GRPO for the large model; the rest comes from the small model")
    format_reward: float = arg(0.25, "reward per --format-tags tag that occurs exactly once in a response")
    format_tags: str = arg("</think>,</answer>", "comma-separated tags of the format reward")
    chat_template: bool = arg(False, "wrap the prompt in the tokenizer's chat template as a user message; false: "
                              "the template is the raw prompt text (R1-Zero on base models)")
    eval_large: bool = arg(True, "evaluate the large model too (eval.jsonl rows tagged 'large'; HF engine)")


PRESETS = {
    "paper": {},
    "1gpu": dict(model="Qwen/Qwen2.5-0.5B", large_model="Qwen/Qwen2.5-1.5B", prompts_per_step=16,
                 max_new_tokens=2048, eval_max_new_tokens=2048, max_prompt_tokens=512, micro_batch_size=4,
                 total_steps=300, eval_every=50, save_every=50),
    "tiny": dict(model="tiny:small", large_model="tiny:large", train_data="tiny:add,mul,lin", problem_key="problem",
                 prompt_template="{problem}", chat_template=True, answer_format="boxed", format_reward=0.0,
                 max_prompt_tokens=64, eval_data="tiny_add,tiny_mul,tiny_lin", eval_limit=128, eval_every=10,
                 eval_samples=4, eval_temperature=1.0, eval_top_p=1.0, eval_max_new_tokens=48, total_steps=40,
                 prompts_per_step=16, group_size=8, max_new_tokens=48, top_p=1.0, lr=1e-4, large_lr=3e-5,
                 kd_coef=0.1, micro_batch_size=64, save_every=20, grader_workers=1, logprob_chunk=4096),
}


# ----------------------------------------------------------------------------------------------------------
# The method: the small model's KD reward (Eq. 1-2), the large model's importance weights (Eq. 4), and the
# PPO-clip update both models take (Eq. 3, 5)
# ----------------------------------------------------------------------------------------------------------
def kd_logratio(logp_L_BT, logp_S_BT, mask_BT, clip: float):
    """Eq. 1: d_i,t = clamp(log π_L_old − log π_S_old, −c, c) on the small model's tokens (0 off the response)."""
    return (logp_L_BT - logp_S_BT).clamp(-clip, clip) * mask_BT


def small_advantages(acc_PG, fmt_PG, d_BT, mask_BT, args: Args):
    """Eq. 2: [B, T] advantages of the small model and its per-sequence KD score s_i = mean_t d_i,t [P, G].
    seq_mean: GRPO on R_i = acc + fmt + λ·s_i; token: GRPO on acc + fmt, plus λ·d_i,t on each token."""
    s_PG = (d_BT.sum(1) / mask_BT.sum(1).clamp(min=1)).view_as(acc_PG)
    if args.kd_level == "seq_mean":
        adv_B = common.group_advantages(acc_PG + fmt_PG + args.kd_coef * s_PG, args.adv_scale).view(-1)
        return adv_B[:, None] * mask_BT, s_PG
    adv_B = common.group_advantages(acc_PG + fmt_PG, args.adv_scale).view(-1)
    return (adv_B[:, None] + args.kd_coef * d_BT) * mask_BT, s_PG


def large_is_weights(logp_L_BT, logp_S_BT, mask_BT, from_small_B, G: int, args: Args):
    """Eq. 4: detached weights [B, T] that carry the small model's samples over to π_L_old; rows the large model
    sampled itself get 1. Also the share of weights truncated (token_mask: dropped), over the small model's tokens
    (seq_snis: its sequences)."""
    C, small_BT = args.is_cap, mask_BT * from_small_B[:, None]
    log_r_BT = (logp_L_BT - logp_S_BT).detach() * small_BT
    ratio_BT = torch.exp(log_r_BT.clamp(max=50.0))
    if args.large_is == "seq_snis":
        from_small_PG = from_small_B.view(-1, G).bool()
        logw_PG = log_r_BT.sum(1).view(-1, G).masked_fill(~from_small_PG, float("-inf"))
        w_PG = logw_PG.softmax(1) * from_small_PG.sum(1, keepdim=True)       # mean 1 over the group's small rows
        cut = ((w_PG > C) & from_small_PG).sum().item() / max(from_small_PG.sum().item(), 1)
        w_BT = w_PG.clamp(max=C).view(-1, 1).expand_as(ratio_BT)
    elif args.large_is == "token_mask":
        keep_BT = (ratio_BT >= 1.0 / C) & (ratio_BT <= C)
        cut = ((~keep_BT).float() * small_BT).sum().item() / max(small_BT.sum().item(), 1)
        w_BT = keep_BT.float()
    else:
        cut = ((ratio_BT > C).float() * small_BT).sum().item() / max(small_BT.sum().item(), 1)
        w_BT = ratio_BT.clamp(max=C) if args.large_is == "token_tis" else torch.ones_like(ratio_BT)
    w_BT = torch.where(from_small_B[:, None].bool(), w_BT, torch.ones_like(w_BT)) * mask_BT
    return w_BT, cut


def ppo_update(model, opt, batch: common.Batch, adv_BT, old_logp_BT, w_BT, lr: float, vocab: int, args: Args,
               engine_logp_BT=None) -> dict:
    """Eq. 3 / Eq. 5: agg(w · −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)) over the batch, in --num-minibatches
    optimizer steps. old_logp_BT None: on-policy, the live log-probs (detached) are π_old. w_BT None: no weights."""
    for g in opt.param_groups:
        g["lr"] = lr
    updates = runtime.minibatches(batch, args.micro_batch_size, args.num_minibatches)
    if old_logp_BT is None and len(updates) > 1:
        raise ValueError("several optimizer steps per batch need the old log-probs computed beforehand")
    meter = runtime.Meter(clock=False)
    for update in updates:
        for rows, mb, norm in runtime.accumulate(update, args.max_new_tokens):
            logp_BT, ent_BT = common.token_logprobs(model, mb, vocab, args.temperature, args.logprob_chunk)
            old_BT = logp_BT.detach() if old_logp_BT is None else old_logp_BT[rows, :mb.T]
            pg_BT, low_BT, high_BT = common.ppo_clip_loss(logp_BT, old_BT, adv_BT[rows, :mb.T], args.clip_low,
                                                          args.clip_high)
            if w_BT is not None:
                pg_BT = w_BT[rows, :mb.T] * pg_BT                      # Eq. 5: the weight multiplies the surrogate
            loss = common.agg_loss(pg_BT, mb.mask_BT, args.loss_agg, norm)
            loss.backward()
            with torch.no_grad():
                m = mb.mask_BT
                meter.add({"loss/pg": loss}, divide_by=len(updates))
                meter.tokens({"policy/entropy": ent_BT * m, "policy/clip_low": low_BT * m,
                              "policy/clip_high": high_BT * m})
                if engine_logp_BT is not None:
                    diff_BT = (old_BT - engine_logp_BT[rows, :mb.T]).abs() * m
                    meter.tokens({"sampling/logp_diff_mean": diff_BT})
                    meter.max({"sampling/logp_diff_max/max": diff_BT})
        runtime.optimizer_step(model, opt, args.max_grad_norm, meter)
    meter.set({"lr": lr})
    return meter.read(batch.mask_BT.sum())


def score(model, batch: common.Batch, vocab: int, args: Args):
    """[B, T] log-probs of the response tokens under `model` as it is now (a pre-update snapshot), no gradient, its
    gathered root released (a frozen large model has no backward that would)."""
    return runtime.score(model, batch, vocab, args.temperature, args.micro_batch_size, args.logprob_chunk)


def merge_groups(x, y, gx: int, gy: int, pad=0):
    """Per prompt, the first gx rows of x's group, then the gy rows of y's, as one group. [B, T] grids of two
    batches differ only in width (right padding), so they are padded to the wider one."""
    if x.ndim == 2:
        T = max(x.shape[1], y.shape[1])
        x, y = F.pad(x, (0, T - x.shape[1]), value=pad), F.pad(y, (0, T - y.shape[1]), value=pad)
    P = y.shape[0] // gy
    return torch.cat([x.view(P, -1, *x.shape[1:])[:, :gx], y.view(P, gy, *y.shape[1:])], 1).flatten(0, 1)


@dataclass
class LargeBatch:
    """The large model's training batch: per group, G_small of the small model's rollouts, then G_own of its own."""
    batch: common.Batch
    old_logp_BT: torch.Tensor | None    # π_L,old, the large model's pre-update log-probs
    behav_logp_BT: torch.Tensor | None  # the sampler's: π_S,old on the small model's rows, π_L,old on its own (w = 1)
    from_small_B: torch.Tensor          # 1 on the small model's rows
    reward_B: torch.Tensor              # accuracy + format
    acc_B: torch.Tensor


def large_model_batch(batch, old_L_BT, old_S_BT, rewards, own, old_own_BT, own_rewards, G_small: int, G_own: int,
                      pad_id: int) -> LargeBatch:
    """CoDistill (G_own = 0): the small model's rollouts as they are; the mixed-group ablation (G_own > 0): each
    group's first G_small small-model rows followed by the large model's own G_own; only its own (G_small = 0).
    rewards, own_rewards: (accuracy, format) of the small model's and of the large model's own rollouts."""
    acc_B, reward_B = rewards[0], rewards[0] + rewards[1]
    if not G_own:
        ones_B = torch.ones(len(acc_B), device=batch.ids_BT.device)
        return LargeBatch(batch, old_L_BT, old_S_BT, ones_B, reward_B, acc_B)
    acc_own_B, reward_own_B = own_rewards[0], own_rewards[0] + own_rewards[1]
    from_small_B = merge_groups(torch.ones(len(acc_B)), torch.zeros(len(acc_own_B)), G_small, G_own)
    mixed = [merge_groups(reward_B, reward_own_B, G_small, G_own), merge_groups(acc_B, acc_own_B, G_small, G_own)]
    if not G_small:
        return LargeBatch(own, old_own_BT, None, from_small_B.to(own.ids_BT.device), *mixed)
    b = common.Batch(merge_groups(batch.ids_BT, own.ids_BT, G_small, G_own, pad_id),
                     merge_groups(batch.mask_BT, own.mask_BT, G_small, G_own))
    return LargeBatch(b, merge_groups(old_L_BT, old_own_BT, G_small, G_own),
                      merge_groups(old_S_BT, old_own_BT, G_small, G_own), from_small_B.to(b.ids_BT.device), *mixed)


def small_metrics(meter, acc_PG, fmt_PG, s_kd_PG, adv_BT, logp_L_old_BT, logp_S_old_BT, mask_BT, args: Args) -> None:
    """The small model's rewards (Eq. 2); its advantage split into the accuracy part (GRPO on acc + fmt alone) and
    the KD part (the rest), as mean |A| per token and the share of tokens whose sign the KD part flips; its token
    KL to the large model with the share of log-ratios the clamp of Eq. 1 cuts (where the large model scored)."""
    adv_acc_BT = common.group_advantages(acc_PG + fmt_PG, args.adv_scale).view(-1, 1) * mask_BT
    meter.tokens({"adv/acc_abs_mean": adv_acc_BT.abs(), "adv/kd_abs_mean": (adv_BT - adv_acc_BT).abs(),
                  "adv/kd_flip_frac": (adv_BT * adv_acc_BT < 0).float()})
    meter.set({"reward/mean": acc_PG.mean(), "reward/format": fmt_PG.mean(), "reward/kd": s_kd_PG.mean(),
               "reward/total": (acc_PG + fmt_PG + args.kd_coef * s_kd_PG).mean(),
               "reward/frac_zero_std": ((acc_PG + fmt_PG).std(1) == 0).float().mean(), "kd/coef": args.kd_coef,
               "reward/frac_all_wrong": (acc_PG.sum(1) == 0).float().mean()})
    if logp_L_old_BT is not None:
        raw_BT = (logp_L_old_BT - logp_S_old_BT) * mask_BT
        meter.tokens({"kl/large": -raw_BT, "kd/clamped_frac": (raw_BT.abs() > args.kd_clip).float() * mask_BT})


def large_metrics(meter, L: LargeBatch, w_BT, is_cut: float) -> None:
    """The large model's accuracy on its batch, and its importance weights over the small model's tokens (Eq. 4)."""
    meter.set({"large/reward/mean": L.acc_B.mean()})
    if w_BT is not None:
        small_BT = L.batch.mask_BT * L.from_small_B[:, None]
        meter.set({"large/is/weight_mean": (w_BT * small_BT).sum().double() / small_BT.sum().double(),
                   "large/is/truncated_frac": is_cut})
        meter.max({"large/is/weight_max/max": w_BT * small_BT})


def task_rewards(grader, ro: engines.Rollouts, args: Args):
    """acc_i (verifier, 0/1) and fmt_i (per-tag format reward) of each rollout: the reward both models share."""
    tags = tuple(t.strip() for t in args.format_tags.split(",") if t.strip())
    acc_B = torch.tensor(grader(ro.texts, ro.answers))
    fmt_B = torch.tensor([verifiers.tag_format_reward(t, tags, args.format_reward) for t in ro.texts])
    return acc_B, fmt_B


def check_args(args: Args) -> int:
    """Reject combinations that would silently do something else; returns the large model's own rollouts per group."""
    G_own = round(args.large_rollout_frac * args.group_size)
    if not 0.0 <= args.large_rollout_frac <= 1.0 or abs(G_own - args.large_rollout_frac * args.group_size) > 1e-6:
        raise ValueError(f"--large-rollout-frac {args.large_rollout_frac} × --group-size {args.group_size} must be a "
                         f"whole number of rollouts between 0 and {args.group_size}")
    if G_own and not args.train_large:
        raise ValueError("--large-rollout-frac > 0 makes the large model sample rollouts to train on, but "
                         "--train-large is false: set one of them back")
    if not args.train_large and args.kd_coef == 0:
        raise ValueError("--train-large false with --kd-coef 0 leaves the large model nothing to do; for plain GRPO "
                         "on the small model use --kd-coef 0 alone (the large model's update never touches it)")
    if args.is_cap < 1.0 or args.kd_clip <= 0:
        raise ValueError(f"--is-cap must be >= 1 (got {args.is_cap}) and --kd-clip > 0 (got {args.kd_clip})")
    return G_own


# ----------------------------------------------------------------------------------------------------------
# Train loop
# ----------------------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    G_own = check_args(args)
    d, out, ckpt = runtime.start(args, __file__)
    G, G_small = args.group_size, args.group_size - G_own

    # --- models and data ---------------------------------------------------------------------------------
    small_path = runtime.resolve(args.model, d)
    tok = runtime.load_tokenizer(small_path)
    vocab = len(tok)  # logits are sliced to the shared tokenizer: Qwen pads vocab_size differently per size
    large_path = runtime.resolve(args.large_model, d)
    runtime.check_same_tokenizer(tok, runtime.load_tokenizer(large_path), "--model", "--large-model",
                                 args.chat_template, args.allow_template_mismatch)
    small = runtime.load_model(small_path, d, trainable=True, vocab=vocab, grad_ckpt=args.grad_checkpointing)
    large = runtime.load_model(large_path, d, trainable=args.train_large, vocab=vocab, grad_ckpt=args.grad_checkpointing)
    engine = engines.make_engine(args.rollout, small_path, d, tok, vocab, args)
    # one vLLM engine per process (each reserves its own memory), and the models differ in shape: the large one uses HF
    large_engine = engines.make_engine("hf", large_path, d, tok, vocab, args) if G_own or args.eval_large else None
    opt = torch.optim.AdamW(small.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    opt_L = torch.optim.AdamW(large.parameters(), lr=args.large_lr, weight_decay=args.weight_decay, fused=True) \
        if args.train_large else None
    models = {"small": small} | ({"large": large} if args.train_large else {})  # what a checkpoint holds
    opts = {"small": opt} | ({"large": opt_L} if args.train_large else {})
    grader = verifiers.Grader(args.grader_workers, args.grader_timeout, args.answer_format)
    rows = common.load_problems(args.train_data, args.train_split, args.problem_key, args.answer_key, seed=args.seed)
    stream = common.PromptStream(rows, args.prompts_per_step, d.rank, d.world, args.seed)
    benches = common.load_benchmarks(args.eval_data, args.eval_data_dir, args.eval_limit)
    train_sampling = engines.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    eval_sampling = engines.Sampling(args.eval_max_new_tokens, args.eval_temperature, args.eval_top_p, args.eval_top_k)
    start = 0
    if ckpt:
        state = runtime.load_checkpoint(ckpt, models, opts, d)
        stream.load_state_dict(state["data"])
        start = state["step"]
    log = runtime.RunLog(out, d, args, start, args.total_steps)
    log.print(f"[codistill] {out}  world={d.world}  device={d.device.type}  steps {start}->{args.total_steps}  "
              f"large model: {'trained' if args.train_large else 'frozen'}, samples {G_own}/{G} of each group"
              + (" with the HF engine (one vLLM engine per process)" if args.rollout == "vllm" and large_engine else ""))
    engines.sync_weights(small, engine)

    def sync_large(step: int) -> None:  # the large model's engine is synced only when it samples, once per step
        engines.sync_weights(large, large_engine, tag=step if args.train_large else "frozen")

    def run_eval(step: int) -> None:
        for name, eng in (("", engine), ("large", large_engine)):
            if name == "large":
                if not args.eval_large or (not args.train_large and large_engine.holds):
                    continue  # a frozen large model is evaluated once
                sync_large(step)
            res = engines.evaluate(eng, tok, benches, grader, args.prompt_template, args.eval_samples, eval_sampling,
                                   [1, 4, 8, 16, 32], d, args.seed, args.max_prompt_tokens, args.chat_template)
            log.eval(step, res, name)

    if start == 0 and args.eval_every and args.total_steps > 0:
        run_eval(0)
    for step in range(start, args.total_steps):
        meter = runtime.Meter()
        lr, lr_L = (runtime.lr_at(step, x, args.lr_warmup_steps) for x in (args.lr, args.large_lr))
        problems = stream.next()

        # --- rollout: G completions per prompt from the small model only (the large model's saving)
        with meter.time("rollout"):
            ro = engines.rollout(engine, tok, problems, G, args.prompt_template, args.max_prompt_tokens, train_sampling,
                                 runtime.rollout_seed(args.seed, step, d.rank), args.chat_template)
            engine.sleep()  # free the GPU for scoring and the updates (vLLM); the weight sync below wakes it
        if G_own:  # --large-rollout-frac > 0: the large model samples G_own of each group itself
            with meter.time("large_rollout"):
                sync_large(step)
                ro_L = engines.rollout(large_engine, tok, problems, G_own, args.prompt_template,
                                       args.max_prompt_tokens, train_sampling,
                                       runtime.rollout_seed(args.seed, step, d.rank, salt=1), args.chat_template)

        # --- reward: verifier accuracy + format reward, shared by both models
        with meter.time("reward"):
            acc_B, fmt_B = task_rewards(grader, ro, args)
            own_rewards = task_rewards(grader, ro_L, args) if G_own else None
        batch = ro.batch(tok.pad_token_id, d.device)
        engine_logp_BT = ro.engine_logprobs(batch.T, d.device)
        large_on_small = args.train_large and G_small > 0
        need_large = args.kd_coef != 0 or large_on_small
        multi = args.num_minibatches > 1

        # --- old log-probs: both models score the small model's rollouts before either updates (Eq. 1, 4)
        with meter.time("small_logp"):
            logp_S_old_BT = score(small, batch, vocab, args) if need_large or multi else None
        with meter.time("large_logp"):
            logp_L_old_BT = score(large, batch, vocab, args) if need_large else None

        # --- the small model's advantages: GRPO on accuracy + format + λ·KD score (Eq. 1-2)
        acc_PG, fmt_PG = (x.view(-1, G).to(d.device) for x in (acc_B, fmt_B))
        d_BT = torch.zeros_like(batch.mask_BT) if logp_L_old_BT is None else \
            kd_logratio(logp_L_old_BT, logp_S_old_BT, batch.mask_BT, args.kd_clip)
        adv_BT, s_kd_PG = small_advantages(acc_PG, fmt_PG, d_BT, batch.mask_BT, args)

        # --- the large model's batch: the small model's rollouts (CoDistill), its own, or a mixed group; Eq. 4
        if args.train_large:
            with meter.time("large_batch"):
                own = ro_L.batch(tok.pad_token_id, d.device) if G_own else None
                old_own_BT = score(large, own, vocab, args) if G_own and (G_small or multi) else None
                L = large_model_batch(batch, logp_L_old_BT, logp_S_old_BT, (acc_B, fmt_B), own, old_own_BT, own_rewards,
                                      G_small, G_own, tok.pad_token_id)
                adv_L_B = common.group_advantages(L.reward_B.view(-1, G), args.adv_scale).view(-1).to(d.device)
                w_BT, is_cut = large_is_weights(L.old_logp_BT, L.behav_logp_BT, L.batch.mask_BT, L.from_small_B, G,
                                                args) if G_small else (None, 0.0)

        # --- update: each model one PPO-clip step on the shared rollouts (Eq. 3, 5)
        with meter.time("update"):
            stats_S = ppo_update(small, opt, batch, adv_BT, logp_S_old_BT if multi else None, None, lr, vocab, args,
                                 engine_logp_BT)
        if args.train_large:
            with meter.time("large_update"):
                stats_L = ppo_update(large, opt_L, L.batch, adv_L_B[:, None] * L.batch.mask_BT, L.old_logp_BT, w_BT,
                                     lr_L, vocab, args)

        # --- weight sync: the small model's rollout engine gets its new weights
        with meter.time("sync"):
            engines.sync_weights(small, engine)

        # --- log
        small_metrics(meter, acc_PG, fmt_PG, s_kd_PG, adv_BT, logp_L_old_BT, logp_S_old_BT, batch.mask_BT, args)
        meter.set({"reward/grader_failures": grader.take_failures()})
        if args.train_large:
            large_metrics(meter, L, w_BT, is_cut)
        metrics = meter.read(batch.mask_BT.sum()) | {f"small/{k}": v for k, v in stats_S.items()} | ro.stats()
        if args.train_large:
            metrics |= {f"large/{k}": v for k, v in (stats_L | (ro_L.stats() if G_own else {})).items()}
        # the large model's share of the step: what standard GRPO for it would cost, on whichever rollouts it uses
        metrics["timing_s/large_step"] = sum(metrics.get(f"timing_s/{k}", 0.0) for k in (
            "large_rollout", "large_batch", "large_update", *(("large_logp",) if large_on_small else ())))
        metrics["perf/tokens_per_s"] = ro.num_tokens / metrics["timing_s/step"]
        log.metrics(step + 1, runtime.all_reduce_mean(metrics, d),
                    show=("reward/mean", "kl/large", "large/reward/mean"))
        log.samples(step + 1, ro.samples(acc_B.tolist(), args.log_samples))

        # --- eval, then checkpoint (so that a checkpoint implies its step's eval is logged)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.total_steps:
            run_eval(step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            runtime.save_checkpoint(out, step + 1, models, opts, {"data": stream.state_dict()}, d,
                                    args.keep_checkpoints)

    # --- final save, eval, summary
    runtime.save_hf(small, tok, out / "final", d)
    if args.train_large:
        runtime.save_hf(large, tok, out / "final_large", d)
    run_eval(args.total_steps)
    log.close(("reward/mean", "kl/large", "large/reward/mean", "response/mean_length", "timing_s/large_step"))
    grader.close()
    log.print(f"[codistill] done: {out}")
    runtime.finish()


if __name__ == "__main__":
    main(cli.parse_args(Args, PRESETS, check=check_args))
