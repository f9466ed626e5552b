"""Beyond GRPO and On-Policy Distillation: a Sparse-to-Dense workflow for LLM post-training
(Xu, Sang et al., arXiv 2605.12483).

A larger teacher is first improved with sparse rewards, then handed to a smaller deployment student through a
dense bridge, after which the student may take sparse-reward steps of its own. Four stages, any subset in order
(`--stages 1,2a,2b,3`), each writing an HF-format model (`stage_<s>/`) that the next stage reads:

  (S1)  teacher GRPO on the labelled data, DAPO-style, no KL:
            L_1  = −(1/Σ|o_i|) Σ_i Σ_t min(ρ_it·A_i, clip(ρ_it, 1−ε_low, 1+ε_high)·A_i)
            A_i  = (r_i − mean_G r) / std_G r,   ρ_it = π_θ(o_it) / π_old(o_it)
  (S2a) forward-KL warmup on teacher rollouts y ~ π_T, full vocabulary, token-mean (enforces C2: the student
        covers the teacher's support before it samples for itself):
            L_2a = (1/Σ_i|y_i|) Σ_i Σ_t KL(π_T(·|s_it) ‖ π_θ(·|s_it)),  y_i ~ π_T   (nll: −log π_θ(y_it|s_it))
  (S2b) on-policy distillation on student rollouts y ~ π_θ, the exact reverse KL at every position:
            L_2b = (1/Σ_i|y_i|) Σ_i Σ_t Σ_v π_θ(v|s_it) [log π_θ(v|s_it) − log π_T(v|s_it)],  y_i ~ π_θ
        --opd-loss sampled: the per-token log-ratio as a dense reward, A_t = log π_T(y_t) − log π_θ(y_t),
        in a REINFORCE loss −A_t·π_θ(y_t)/sg(π_θ(y_t)); both have the same expected gradient per position.
  (S3)  student GRPO (as S1) on held-out labels; `--stage3-data replay` is the matched control (the same number
        of updates on prompts the upstream stages already used: no new labels).
The teacher is a frozen target in S2a and S2b (the C1 condition, a reward-shaped teacher, is what S1 provides).

The paper's ablations are stage subsets, one command each:
    --stages 2a,2b,3                raw teacher (no S1)          --stages 1,2b,3     no forward-KL warmup
    --stages 1,2a,3                 no on-policy distillation    --stages 3 --stage3-data all   cold GRPO
    --stage3-data replay            the matched replay control for S3

Reconstructions of details the paper leaves open:
  1. S1/S3 follow the authors' GRPO script: clip 0.2/0.28, dual clip c = 10 on negative advantages, token-mean,
     no KL or entropy term, 512 prompts × 8, PPO mini-batches of 128 prompts (4 updates per rollout batch), lr 1e-6,
     weight decay 0.1, grad clip 1.0, T = 1. S2b follows the authors' OPD trainer: 256 prompts × 1 rollout, one
     optimizer step per rollout batch, no ratio or clip, exact reverse KL. S2a uses S2b's batch and schedule on
     teacher rollouts (its code is not published).
  2. Stage lengths are not published: 400 / 200 / 800 / 100 steps by default (about 15 epochs, the authors' code
     default, for S1 and S2b on the 80% split, and for S3 on the 20% one; S2a a quarter of S2b).
  3. "Held-out labels": a seeded (42) 80/20 split of the training set, as in the authors' data preparation;
     S1, S2a and S2b see the 80%, S3 the 20% (`heldout`), the 80% again (`replay`) or everything (`all`).
  4. Data: the deduplicated DAPO-Math-17k (open-r1's processing of it); its "Answer:" instructions are stripped
     and the prompt asks for \\boxed{} as in the authors' pipeline; Qwen3 in non-thinking mode. The reward is
     math-verify accuracy on the last \\boxed{} (the authors use a Hendrycks string match, slightly stricter).
  5. Evaluation avg@16 at T 0.7, top-p 0.8, top-k 20 (Qwen3's non-thinking setting, the authors' eval script),
     up to 16,384 tokens, on MATH-500 and AIME 2024/2025, after every stage.
Deviations: the distillation losses are token-means over the global batch (the authors average per-micro-batch
token-means), so the result does not depend on how a batch is cut into micro-batches or ranks.

Rollout engines. Only one model generates in each stage (the teacher in S1 and S2a, the student in S2b and S3).
This project keeps one vLLM engine per process (each reserves its own memory) and teacher and student differ in
shape, so `--rollout vllm` serves the one role that generates in all the requested stages: run `--stages 1,2a`
and then `--stages 2b,3` (pointing `--teacher`/`--model` at the first run's stage folders); a mix is refused with
that advice. The model that only needs evaluation there (the student after S2a) is sampled by the HF engine.

Tiny preset: tiny:large teaches tiny:small; 10/10/10/20 steps for S1/S2a/S2b/S3 (S3 longer, so the GRPO stage
has room to move after distillation), the student's lr 1e-4 (the toy world's working RL rate) and the teacher's
3e-5 (the tiny large model is near its ceiling; in codistill_grpo.py's measurement it lost held-out accuracy when
trained at 1e-4 and held it at 3e-5).

Run:
    torchrun --nproc_per_node 8 sparse_to_dense.py --rollout vllm --stages 1,2a --output-dir runs/s2d-t
    torchrun --nproc_per_node 8 sparse_to_dense.py --rollout vllm --stages 2b,3 --output-dir runs/s2d-s \\
        --teacher runs/s2d-t/stage_1 --model runs/s2d-t/stage_2a       # Qwen3-8B -> Qwen3-1.7B, 8 GPUs
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
    preset: str = arg("paper", "bundle of defaults: paper | 1gpu | tiny (CPU toy world); explicit flags win")
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
    max_prompt_tokens: int = arg(2048, "prompts are left-truncated to this many tokens")
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
    steps_1: int = arg(400, "stage 1 (teacher GRPO) optimizer steps")
    steps_2a: int = arg(200, "stage 2a (forward-KL warmup) optimizer steps")
    steps_2b: int = arg(800, "stage 2b (on-policy distillation) optimizer steps")
    steps_3: int = arg(100, "stage 3 (student GRPO) optimizer steps")
    prompts_per_step: int = arg(512, "P: prompts per GRPO step (stages 1 and 3) over all ranks")
    group_size: int = arg(8, "G: completions per prompt in GRPO stages")
    max_new_tokens: int = arg(8192, "response budget in training")
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
    weight_decay: float = arg(0.1, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    micro_batch_size: int = arg(8, "sequences per forward/backward")
    num_minibatches: int = arg(4, "optimizer steps per rollout batch in GRPO stages (distillation: always 1)")
    clip_low: float = arg(0.2, "PPO clip ε_low")
    clip_high: float = arg(0.28, "PPO clip ε_high")
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
    stages: str = arg("1,2a,2b,3", "stages to run, in order: any subset of 1,2a,2b,3 (a left-out stage is an "
                      "ablation: 2a,2b,3 = raw teacher, 1,2b,3 = no warmup, 1,2a,3 = no OPD)")
    teacher: str = arg("Qwen/Qwen3-8B", "teacher sharing the student's tokenizer: stage 1 starts from it; without "
                       "stage 1 it is the distillation target as is (e.g. another run's stage_1/)")
    allow_template_mismatch: bool = arg(False, "accept a teacher whose chat template differs from the "
                                        "student's (it would score prompts in the student's format)")
    teacher_lr: float = arg(1e-6, "AdamW learning rate of the teacher in stage 1")
    distill_prompts_per_step: int = arg(256, "prompts per step of stages 2a and 2b over all ranks")
    distill_group_size: int = arg(1, "rollouts per prompt in stages 2a and 2b")
    fkl_loss: Literal["full", "nll"] = arg("full", "stage 2a: exact full-vocabulary KL(π_T‖π_θ) on teacher "
                                           "rollouts, or nll = plain SFT on the teacher's samples (the baseline)")
    opd_loss: Literal["full", "sampled"] = arg("full", "stage 2b: exact full-vocabulary KL(π_θ‖π_T) per position, "
                                               "or sampled = log π_T − log π_θ of the sampled token as its advantage")
    dual_clip: float = arg(10.0, "dual-clip c: a negative-advantage token's loss is at most c·|A| (0 = off)")
    stage3_data: Literal["heldout", "replay", "all"] = arg("heldout", "stage 3 labels: the held-out split, the "
                                                           "upstream split again (matched replay control), or all")
    heldout_frac: float = arg(0.2, "share of the training set held out for stage 3")
    split_seed: int = arg(42, "seed of the held-out split")
    enable_thinking: bool = arg(False, "passed to the chat template (Qwen3: false = non-thinking mode, the paper's)")


PRESETS = {
    "paper": {},
    "1gpu": dict(model="Qwen/Qwen3-0.6B", teacher="Qwen/Qwen3-1.7B", prompts_per_step=64, distill_prompts_per_step=64,
                 num_minibatches=2, max_new_tokens=2048, eval_max_new_tokens=4096, max_prompt_tokens=512,
                 eval_samples=4, micro_batch_size=4, steps_1=100, steps_2a=50, steps_2b=100, steps_3=50,
                 eval_every=0),
    "tiny": dict(model="tiny:small", teacher="tiny:large", train_data="tiny:add,mul,lin", problem_key="problem",
                 answer_key="answer", prompt_template="{problem}", max_prompt_tokens=64,
                 eval_data="tiny_add,tiny_mul,tiny_lin", eval_limit=128, eval_every=10, eval_samples=4,
                 eval_temperature=1.0, eval_top_p=1.0, eval_top_k=0, eval_max_new_tokens=48, steps_1=10,
                 steps_2a=10, steps_2b=10, steps_3=20, prompts_per_step=16, group_size=8, distill_prompts_per_step=32,
                 max_new_tokens=48, lr=1e-4, teacher_lr=3e-5, num_minibatches=1, micro_batch_size=64, save_every=10,
                 grader_workers=1, logprob_chunk=4096),
}

STAGES = ("1", "2a", "2b", "3")
TRAINS = {"1": "teacher", "2a": "student", "2b": "student", "3": "student"}      # the model a stage updates
GENERATES = {"1": "teacher", "2a": "teacher", "2b": "student", "3": "student"}   # the model that samples its data
GRPO_STAGES = ("1", "3")


# ----------------------------------------------------------------------------------------------------------
# The method: the stages' objectives (S1-S3 in the docstring) and the held-out split
# ----------------------------------------------------------------------------------------------------------
def grpo_loss(logp_BT, old_logp_BT, adv_B, mask_BT, norm, args: Args):
    """(S1), (S3): clipped surrogate with clip-higher and the dual clip of the authors' GRPO, token-mean, no KL.
    Returns (loss, clipped-low map, clipped-high map)."""
    adv_BT = adv_B[:, None].expand_as(logp_BT)
    pg_BT, low_BT, high_BT = common.ppo_clip_loss(logp_BT, old_logp_BT, adv_BT, args.clip_low, args.clip_high)
    if args.dual_clip > 0:  # a huge ratio on a bad token would otherwise give an unbounded step
        pg_BT = torch.where(adv_BT < 0, torch.minimum(pg_BT, -args.dual_clip * adv_BT), pg_BT)
    return common.agg_loss(pg_BT, mask_BT, args.loss_agg, norm), low_BT, high_BT


def fkl_token_loss(h_NH, head, h_t_NH, head_t, targets_N, vocab: int, args: Args) -> torch.Tensor:
    """(S2a) per teacher-sampled token [N]: KL(π_T(·|s_t) ‖ π_θ(·|s_t)) over the shared vocabulary (`full`), or
    −log π_θ(y_t|s_t) (`nll`: SFT on the teacher's samples, the sampled-token estimator of the same gradient)."""
    if args.fkl_loss == "full":
        return common.kl_from_hidden(h_NH, head, h_t_NH, head_t, vocab, "forward", args.logprob_chunk)
    return -common.logprobs_from_hidden(h_NH, head, targets_N, vocab, 1.0, args.logprob_chunk)[0]


def opd_token_loss(h_NH, head, h_t_NH, head_t, targets_N, vocab: int, args: Args) -> torch.Tensor:
    """(S2b) per student-sampled token [N]: Σ_v π_θ(v)(log π_θ(v) − log π_T(v)) (`full`), or the dense implicit
    reward A_t = log π_T(y_t) − log π_θ(y_t) in an on-policy REINFORCE loss (`sampled`). Both values are the
    token's reverse-KL estimate (exact / single-sample k1), and both gradients agree in expectation over y_t."""
    if args.opd_loss == "full":
        return common.kl_from_hidden(h_NH, head, h_t_NH, head_t, vocab, "reverse", args.logprob_chunk)
    logp_N, _ = common.logprobs_from_hidden(h_NH, head, targets_N, vocab, 1.0, args.logprob_chunk)
    with torch.no_grad():
        t_logp_N, _ = common.logprobs_from_hidden(h_t_NH, head_t, targets_N, vocab, 1.0, args.logprob_chunk)
    adv_N = (t_logp_N - logp_N).detach()
    return -adv_N * torch.exp(logp_N - logp_N.detach())  # ratio 1 on-policy; its value is −A_t = k1


def split_labels(rows: list[dict], heldout_frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split of the labelled set into (upstream, held-out): stages 1, 2a, 2b use the first, stage 3 the
    second. Both keep the original row order."""
    if not 0 < heldout_frac < 1:
        raise ValueError(f"--heldout-frac {heldout_frac} must lie strictly between 0 and 1")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:round(len(rows) * heldout_frac)])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


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
def grpo_update(model, opt, batch, correct_B, engine_logp_BT, vocab: int, args: Args, meter) -> None:
    """One GRPO rollout batch: group advantages, old log-probs (off-policy mini-batches only), clipped updates."""
    correct_PG = correct_B.view(-1, args.group_size)
    adv_B = common.group_advantages(correct_PG, args.adv_scale).view(-1).to(batch.ids_BT.device)
    updates = runtime.minibatches(batch, args.micro_batch_size, args.num_minibatches)
    old_logp_BT = common.score_logprobs(model, batch, vocab, args.temperature, args.micro_batch_size,
                                        args.logprob_chunk) if len(updates) > 1 else None
    for update in updates:
        for rows, mb, norm in runtime.accumulate(model, update, args.max_new_tokens):
            logp_BT, ent_BT = common.token_logprobs(model, mb, vocab, args.temperature, args.logprob_chunk)
            old_BT = logp_BT.detach() if old_logp_BT is None else old_logp_BT[rows, :mb.T]
            loss, low_BT, high_BT = grpo_loss(logp_BT, old_BT, adv_B[rows], mb.mask_BT, norm, args)
            loss.backward()
            with torch.no_grad():
                m, diff_BT = mb.mask_BT, (old_BT - engine_logp_BT[rows, :mb.T]).abs() * mb.mask_BT
                meter.add({"loss/pg": loss}, divide_by=len(updates))
                meter.tokens({"policy/entropy": ent_BT * m, "policy/clip_low": low_BT * m,
                              "policy/clip_high": high_BT * m, "sampling/logp_diff_mean": diff_BT})
                meter.max({"sampling/logp_diff_max/max": diff_BT})
        runtime.optimizer_step(model, opt, args.max_grad_norm, meter)
    meter.set({"reward/frac_zero_std": (correct_PG.std(1) == 0).float().mean()})


def distill_update(stage: str, student, teacher, opt, batch, engine_logp_BT, vocab: int, args: Args, meter) -> None:
    """One distillation step (S2a or S2b): the teacher's full next-token distributions at the rollout's
    positions, the student's token loss, one optimizer step (timing the teacher's forward apart)."""
    key = "kl/forward" if stage == "2a" else "kl/reverse"
    (update,) = runtime.minibatches(batch, args.micro_batch_size, 1)
    for rows, mb, norm in runtime.accumulate(student, update, args.max_new_tokens):
        h_NH, targets_N = common.response_hidden(student, mb), common.response_targets(mb)
        h_t_NH = None
        if not (stage == "2a" and args.fkl_loss == "nll"):  # plain SFT needs no teacher forward
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
            if stage == "2a" and args.fkl_loss == "nll":  # sampled estimate: the engine's teacher log-probs
                kl = (engine_logp_BT[rows, :mb.T] * mb.mask_BT).sum().double() + kl
            meter.tokens({key: kl})
    runtime.optimizer_step(student, opt, args.max_grad_norm, meter)


def stage_done(out: Path, stage: str) -> Path:
    return out / f"stage_{stage}.json"


def mark_done(out: Path, stage: str, summary: dict, d) -> None:
    """Write stage_<s>.json atomically, after the stage's model is saved: --resume reads it as a finished stage."""
    if d.main:
        tmp = stage_done(out, stage).with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, stage_done(out, stage))
    runtime.barrier()


def resume_point(args: Args, out: Path, stages: list[str]):
    """(number of stages already complete, checkpoint inside the next stage or None) of the run to resume."""
    p = Path(args.resume)
    if (p / "trainer_state.pt").exists():  # an explicit checkpoint: continue from there, redoing later stages
        ckpt = p
        done = stages.index(torch.load(p / "trainer_state.pt", weights_only=True)["stage"])
        return done, ckpt
    done = 0
    while done < len(stages) and stage_done(out, stages[done]).exists():
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


def check_args(args: Args) -> tuple[list[str], dict[str, int]]:
    """The requested stages and their step counts, or a clear error for a combination that cannot run."""
    stages = parse_stages(args.stages)
    steps = {"1": args.steps_1, "2a": args.steps_2a, "2b": args.steps_2b, "3": args.steps_3}
    if any(steps[s] < 1 for s in stages):
        raise ValueError("every stage in --stages needs --steps-<s> >= 1; leave a stage out to skip it")
    world = cli.world_size()
    for s in stages:
        name, n = ("--prompts-per-step", args.prompts_per_step) if s in GRPO_STAGES else \
            ("--distill-prompts-per-step", args.distill_prompts_per_step)
        if n % world:
            raise ValueError(f"{name} {n} does not divide by the world size {world} (WORLD_SIZE): use a multiple of "
                             f"{world}, e.g. {name} {max(world, n - n % world)}, or launch {world} ranks that divide it")
    if args.rollout == "vllm" and len({GENERATES[s] for s in stages}) > 1:
        raise ValueError(f"--rollout vllm holds one model per process, but --stages {args.stages} samples from both "
                         f"the teacher (1, 2a) and the student (2b, 3). Run --stages 1,2a first, then --stages 2b,3 "
                         f"with --teacher RUN/stage_1 --model RUN/stage_2a, or use --rollout hf")
    return stages, steps


def stage_data(args: Args) -> dict[str, list[dict]]:
    """Each stage's problems: the labelled upstream split for 1, 2a and 2b; for 3 the held-out split (the paper),
    the upstream one again (replay control) or all of it."""
    rows = common.load_problems(args.train_data, args.train_split, args.problem_key, args.answer_key, seed=args.seed)
    rows = [{**r, "problem": common.strip_dapo_wrapper(r["problem"])} for r in rows]
    upstream, heldout = split_labels(rows, args.heldout_frac, args.split_seed)
    return {"1": upstream, "2a": upstream, "2b": upstream,
            "3": {"heldout": heldout, "replay": upstream, "all": rows}[args.stage3_data]}


def stage_roles(stages: list[str]) -> set[str]:
    """The roles these stages load: the one each stage trains, and the teacher wherever it is distilled (2a, 2b)."""
    return {TRAINS[s] for s in stages} | ({"teacher"} if {"2a", "2b"} & set(stages) else set())


def stage_sources(args: Args, stages: list[str], out: Path) -> dict[str, dict[str, str]]:
    """Where each stage's models start: the flags' models, or the output of the last earlier stage that trained
    that role."""
    sources, src = {"teacher": args.teacher, "student": args.model}, {}
    for s in stages:
        src[s] = dict(sources)
        sources[TRAINS[s]] = str(out / f"stage_{s}")
    return src


def model_fields(args: Args) -> list[str]:
    """The model flags this run loads: --teacher where a stage trains or samples from it, --model where one trains
    the student."""
    roles = stage_roles(parse_stages(args.stages))
    return [f for r, f in (("teacher", "teacher"), ("student", "model")) if r in roles]


def main(args: Args) -> None:
    stages, steps = check_args(args)
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir is not None and (resume_dir / "trainer_state.pt").exists():
        resume_dir = resume_dir.parent.parent
    d, out, _ = runtime.start(args, __file__, run_dir=args.output_dir or (str(resume_dir) if resume_dir else ""))
    done, ckpt = resume_point(args, out, stages) if args.resume else (0, None)
    offset = {s: sum(steps[x] for x in stages[:i]) for i, s in enumerate(stages)}
    total = sum(steps[s] for s in stages)

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
    data = stage_data(args)
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
            m = runtime.load_model(paths[role], d, trainable=False, vocab=vocab)
            run_eval(m, role, 0)
            del m

    for si, stage in enumerate(stages):
        if si < done:
            continue
        role, gen_role, n_steps = TRAINS[stage], GENERATES[stage], steps[stage]
        runtime.seed_everything(args.seed)
        model_path = {r: runtime.resolve(p, d) for r, p in src[stage].items()}
        model = runtime.load_model(model_path[role], d, trainable=True, vocab=vocab, grad_ckpt=args.grad_checkpointing)
        teacher = runtime.load_model(model_path["teacher"], d, trainable=False, vocab=vocab) if role == "student" \
            and stage in ("2a", "2b") else None
        lr = args.teacher_lr if role == "teacher" else args.lr
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, fused=True)
        grpo = stage in GRPO_STAGES
        per_step, G = (args.prompts_per_step, args.group_size) if grpo else \
            (args.distill_prompts_per_step, args.distill_group_size)
        stream = common.PromptStream(data[stage], per_step, d.rank, d.world, args.seed * 1000 + STAGES.index(stage))
        first = 0
        if ckpt is not None and si == done:
            state = runtime.load_checkpoint(ckpt, {role: model}, {role: opt}, d)
            stream.load_state_dict(state["data"])
            first = state["stage_step"]
        gen_model, gen_engine = model if gen_role == role else teacher, engine(gen_role)
        log.print(f"[stage {stage}] trains the {role} from {src[stage][role]}; rollouts from the {gen_role}; "
                  f"{len(data[stage])} problems, {per_step} x {G} per step, steps {first}->{n_steps}")

        for step in range(first, n_steps):
            meter = runtime.Meter()
            lr_now = runtime.set_lr(opt, step, lr, args.lr_warmup_steps)

            # --- weight sync: the engine gets the sampling model's current weights (vLLM discards them in sleep)
            with meter.time("sync"):
                engines.sync_weights(gen_model, gen_engine)

            # --- rollout: from the model that generates in this stage
            with meter.time("rollout"):
                ro = engines.rollout(gen_engine, tok, stream.next(), G, args.prompt_template, args.max_prompt_tokens,
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
                if grpo:
                    grpo_update(model, opt, batch, correct_B, engine_logp_BT, vocab, args, meter)
                else:
                    distill_update(stage, model, teacher, opt, batch, engine_logp_BT, vocab, args, meter)

            # --- log
            meter.set({"reward/mean": correct_B.mean(), "lr": lr_now, "reward/grader_failures": grader.take_failures()})
            metrics = meter.read(batch.mask_BT.sum()) | ro.stats()
            metrics["timing_s/update"] -= metrics.get("timing_s/teacher", 0.0)
            metrics["perf/tokens_per_s"] = ro.num_tokens / metrics["timing_s/step"]
            gstep = offset[stage] + step + 1
            log.metrics(gstep, {"stage": stage, "stage_step": step + 1, **runtime.all_reduce_mean(metrics, d)},
                        show=("reward/mean", "kl/forward", "kl/reverse"))
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
                               "problems": len(data[stage]),
                               "teacher": src[stage]["teacher"] if teacher is not None else None,
                               "steps": [offset[stage], offset[stage] + n_steps],
                               "output": str(out / f"stage_{stage}"), "eval": res}, d)
        ckpt = None
        del model, teacher, opt
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
