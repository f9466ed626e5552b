"""CoPD: Co-Evolving Policy Distillation (Gu, Yang, Si et al., arXiv 2604.27083).

K branches start from one base π_0, one capability (dataset D_k, verifier r_k) each, and alternate for N cycles (Alg. 1):

    Phase I  (S_RL steps):  every branch runs GRPO on its own data                                     (Eq. rlvr)
    Phase II (S_OPD steps): every step of branch k is ONE update over a native GRPO batch on D_k plus a cross batch:
                            k samples the partner j's prompts x' ~ D_j and gets the token advantage
                            Â_t = β_k · δ_t,  δ_t = log π_θj(y_t | x', y_<t) − log π_θk(y_t | x', y_<t)  (Eq. delta)
                            scored by the partner's live weights before any branch updates that step.
    End:                    θ* = (1/K) Σ_k θ_k, a uniform merge saved in HF format.

Both batches enter one PPO-clip surrogate (ε 0.2/0.28, §4.1), no KL term, aggregated as Eq. (rlvr) writes it:
(1/G) Σ_i (1/|y_i|) Σ_t, a mean of per-sequence token means (--loss-agg; token-mean as a flag), over native and cross
sequences alike (Alg. 1 combines both batches in one update; OPD's loss, Eq. opd of §2.1, is a per-sequence token
mean too). For K ≥ 3 the branches form a hub and spokes (§3.3): a spoke learns from the hub, the hub from every spoke
(its cross budget split equally). Top-10 overlap O_10 and symmetric KL between branches (§4.3) are computed on fresh
on-policy rollouts of every branch on every dataset at the end of each phase (diag/*).

Baselines (§4.1), with T = --total-steps optimizer steps per branch:
    copd         K branches × T steps (N = T / (S_RL + S_OPD) cycles), merged                    K·T updates
    experts      K experts × T steps of GRPO on their own data; also merged (weight averaging)  K·T updates
    mixed        one model, K·T GRPO steps on one pool of all data (§4.1; --mixed-pool)         K·T updates
    static_opd   the K = 2 experts (T steps each), then the student (--static-student) learns
                 from the other, frozen, by pure OPD on the teacher's data for one extra stage  K·T + T_opd updates
    mopd         the K experts (T steps each), then a fresh copy of π_0 learns from all of them,
                 frozen, by pure OPD on every dataset, each prompt scored by its own expert    K·T + T_opd updates
The paper contradicts itself on budgets: §4.1 gives mixed RLVR and CoPD "the sum of the two specific experts" (K·T),
Tables 1-2's captions give CoPD "the same total steps as static OPD" (K·T + T_opd). The text is followed here.

Reconstructions of what the paper leaves open:
  1. Paper preset: math (Polaris-53K, math-verify) and code (KodCode-Light-RL-10K, its pytest file run on the last
     ```python block in a sandbox, verifiers.CodeVerifier); 256 prompts × 8, lr 1e-6, T 1.0, 16,384 tokens (§4.1).
  2. β = 1; S_RL : S_OPD = 15 : 10 (the paper's best ratio, 1.5 : 1, §4.3; absolute values not given); T = 200 steps
     per branch; the cross batch is half of each Phase-II step's prompts (same prompts per step as Phase I).
  3. δ's student term is the rollout-time log-prob, detached (the live one: one update per batch). Teachers are live,
     scoring with their weights before the step's updates (Alg. 1's commented-out "freeze teacher states" is not).
  4. Alg. 1's Merge(θ_0, θ_1, …, θ_{K−1}) reuses θ_0, the base's symbol; read as the K branches (θ_0…θ_{K−1}), no
     base, "simple parameter merging" (§3.3) as a uniform average (--merge-weights). static_opd: T_opd = T·S_OPD/
     (S_RL+S_OPD). MOPD (the MiMo-V2-Flash recipe the paper cites, no details): the student starts at π_0, each
     step splits its prompts equally over the K datasets, Â_t = δ_t (β 1) in the same surrogate, T_opd = T.
  5. Symmetric KL = KL(p‖q) + KL(q‖p) over the full vocabulary, averaged over response tokens; O_k = |top_k(p) ∩
     top_k(q)| / k; both on 1 sample from each branch for --diag-prompts prompts of every dataset (Eq. overlap takes
     the student's samples; two co-equal branches give both theirs).
  6. Evaluation: math avg@4 at T 0.7, top-p 0.8, top-k 20 (the authors' validation settings) on the paper's text
     benchmarks (§4.1: AIME 24/25, HMMT 2025, MATH-500, Minerva); code pass rate on a held-out slice of its data.
  7. With --num-minibatches M > 1 (the paper makes one update per batch), optimizer step u takes the u-th 1/M of
     both the native and the cross part, so every step sees both signals.
Deviations: the paper trains Qwen3-VL-4B-Instruct on text, image and video, the paper preset Qwen3-4B-Instruct-2507
on math and code. §2.1 writes OPD as KL(π_T‖π_θ); the method (Eq. delta) and this script use the sampled reverse-KL
token reward. One rollout engine serves every branch (one vLLM engine per process): a step costs K weight pushes.
Tiny preset: base tiny:habits, a warm start with a different bad habit in `add` and `lin` (tiny.py), so the branches
have different things to learn; T = 40 steps per branch, S_RL : S_OPD = 6 : 4 (the paper's 1.5 : 1), lr 1e-4.
Interference worlds: tiny:formats boxes or tags its answer at random in `add` and `lin`, graded on the box and the
tag; tiny:cue_* do so on `add` and a rewording of it, told apart only by the wording. The paper's pilot study (§2.3)
in the toy world: bench/copd_pilot.py.

Run:
    torchrun --nproc_per_node 8 copd.py --rollout vllm          # paper setup: math + code branches, 8 GPUs
    python copd.py --preset 1gpu --rollout vllm                 # one 80 GB GPU, a 1.5B model
    python copd.py --preset tiny                                # CPU toy world: add and lin as the two capabilities
    python copd.py --preset tiny --mode mixed                   # a baseline: mixed RLVR at the same total steps
    python copd.py --preset tiny --model tiny:formats --verifiers math math_tag --eval-verifiers math math_tag
"""

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
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


@dataclass
class Args:
    # --- run -------------------------------------------------------------------------------------------
    preset: str = arg("paper", "bundle of defaults: paper | 1gpu | tiny (CPU toy world); explicit flags win")
    output_dir: str = arg("", "run directory (default runs/<script>-<preset>-<time>)")
    resume: str = arg("", "continue a run: its directory (latest checkpoint) or a checkpoints/step_N folder")
    overwrite: bool = arg(False, "empty an --output-dir that holds a run (otherwise such a directory is refused)")
    seed: int = arg(0, "seed for model init, data order and rollouts")
    # --- policy and data (one value for every branch, or one per branch) --------------------------------
    model: str = arg("Qwen/Qwen3-4B-Instruct-2507", "base model π_0 every branch starts from: hub name, folder, tiny:*")
    train_data: list[str] = arg(["POLARIS-Project/Polaris-Dataset-53K", "KodCode/KodCode-Light-RL-10K"],
                                "one dataset per branch (hub dataset, .jsonl file or tiny:<families>); K = their count")
    train_split: str = arg("train", "split of every --train-data")
    problem_key: list[str] = arg(["problem", "question"], "column holding the problem text (one, or one per branch)")
    answer_key: list[str] = arg(["answer", "test"], "column holding the gold answer, or a code branch's pytest file")
    prompt_template: list[str] = arg(
        ["{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
         "{problem}\n\nWrite your solution as one Python code block (```python ... ```)."],
        "user message per branch; {problem} is filled in")
    answer_format: Literal["boxed", "answer_tag"] = arg("boxed", "where a math branch's final answer is read from")
    max_prompt_tokens: int = arg(2048, "prompts are left-truncated to this many tokens")
    # --- evaluation ------------------------------------------------------------------------------------
    eval_data: str = arg("math500,aime24,aime25,hmmt25,minerva_math", "math benchmarks (names, .jsonl, tiny_<family>)")
    eval_data_dir: str = arg("", "folder with <benchmark>.jsonl files, used before the hub")
    eval_limit: int = arg(0, "evaluate on the first N problems of each benchmark (0 = all)")
    eval_every: int = arg(50, "evaluate every branch every N steps (and the base at 0, the final model at the end)")
    eval_samples: int = arg(4, "samples per problem: avg@n, pass@k, maj@n")
    eval_temperature: float = arg(0.7, "evaluation sampling temperature")
    eval_top_p: float = arg(0.8, "evaluation top-p")
    eval_top_k: int = arg(20, "evaluation top-k (0 = off)")
    eval_max_new_tokens: int = arg(16384, "evaluation response budget")
    # --- rollouts --------------------------------------------------------------------------------------
    total_steps: int = arg(200, "T: optimizer steps per branch (mixed runs K·T, static_opd adds T_opd)")
    prompts_per_step: int = arg(256, "P: prompts per branch per step over all ranks (native + cross in Phase II)")
    group_size: int = arg(8, "G: completions per prompt")
    max_new_tokens: int = arg(16384, "response budget in training")
    temperature: float = arg(1.0, "rollout temperature")
    top_p: float = arg(1.0, "rollout top-p")
    top_k: int = arg(0, "rollout top-k (0 = off)")
    rollout: Literal["hf", "vllm"] = arg("hf", "rollout engine: vllm (colocated, GPU or CPU) or hf (any device)")
    rollout_batch_size: int = arg(256, "hf engine: sequences generated at once")
    vllm_gpu_memory_utilization: float = arg(0.3, "vllm engine: its share of GPU memory")
    vllm_sleep_level: int = arg(2, "vllm engine: 1 offloads weights to CPU while training, 2 discards them (GPU)")
    vllm_kv_cache_gib: float = arg(0.0, "vllm engine: KV-cache GiB (0 = on GPUs from the memory share, on CPUs 1)")
    # --- optimisation ----------------------------------------------------------------------------------
    lr: float = arg(1e-6, "AdamW learning rate (every branch)")
    lr_warmup_steps: int = arg(0, "linear warmup steps")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    micro_batch_size: int = arg(8, "sequences per forward/backward")
    num_minibatches: int = arg(1, "optimizer steps per rollout batch (1 = on-policy, as in the paper)")
    clip_low: float = arg(0.2, "PPO clip ε_low")
    clip_high: float = arg(0.28, "PPO clip ε_high")
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = arg(
        "seq-mean-token-mean", "loss aggregation (Eq. rlvr: a sequence mean of token means)")
    adv_scale: Literal["std", "none"] = arg("std", "group advantage: std-normalised (GRPO) or none (Dr. GRPO)")
    grad_checkpointing: bool = arg(True, "activation checkpointing of decoder layers (CUDA only)")
    logprob_chunk: int = arg(1024, "tokens per chunk of LM head + log-softmax")
    # --- bookkeeping -----------------------------------------------------------------------------------
    save_every: int = arg(50, "checkpoint every N steps (0 = never)")
    keep_checkpoints: int = arg(2, "checkpoints kept on disk")
    log_samples: int = arg(2, "rollouts per rank and branch written to samples.jsonl each step")
    report_to: Literal["none", "wandb", "tensorboard"] = arg("none", "also log metrics, evaluations and the config to W&B or TensorBoard")
    grader_workers: int = arg(2, "math-verify worker processes per rank")
    grader_timeout: float = arg(5.0, "seconds per answer before it scores 0")
    # --- CoPD --------------------------------------------------------------------------------------------
    mode: Literal["copd", "experts", "mixed", "static_opd", "mopd"] = arg("copd", "the method or a baseline (see docstring)")
    mixed_pool: Literal["single", "stratified"] = arg("single", "mixed: one pool of all data (§4.1) or 1/K per set")
    verifiers: list[str] = arg(["math", "code"], "reward per branch: math (math-verify on --answer-format), math_tag "
                               "(math-verify on <answer>...</answer>) or code (sandboxed pytest)")
    eval_verifiers: list[str] = arg([], "verifier of each --eval-data benchmark, in order (empty = math for all)")
    s_rl: int = arg(15, "S_RL: Phase-I (branch GRPO) steps per cycle")
    s_opd: int = arg(10, "S_OPD: Phase-II (GRPO + mutual OPD) steps per cycle")
    beta: list[float] = arg([1.0], "β_k: weight of the cross-branch advantage (Eq. delta), one or one per branch")
    cross_frac: float = arg(0.5, "share of a Phase-II step's prompts that are the partner's (the cross batch)")
    phase2_native_rl: bool = arg(True, "keep native GRPO in Phase II (off: a pure-OPD Phase II)")
    hub: int = arg(0, "K ≥ 3: the hub branch of the hub-and-spoke topology")
    static_student: int = arg(1, "static_opd: the expert that learns from the other, frozen one")
    static_teacher: str = arg("", "static_opd: the teacher's start; with --total-steps 0, OPD from it to --model")
    static_opd_steps: int = arg(0, "static_opd, mopd: T_opd, steps of the OPD stage (0 = T·S_OPD/(S_RL+S_OPD), mopd T)")
    merge_weights: list[float] = arg([], "weights of the final merge, one per branch (empty = uniform 1/K)")
    overlap_k: int = arg(10, "k of the top-k overlap diagnostic O_k")
    diag_prompts: int = arg(32, "prompts per dataset for the O_k / symmetric-KL diagnostics (0 = off)")
    code_workers: int = arg(8, "code verifier: samples run at once per rank")
    code_timeout: float = arg(10.0, "code verifier: seconds per sample (wall clock; CPU time likewise)")
    code_memory_mb: int = arg(2048, "code verifier: address-space limit per sample")
    code_heldout: int = arg(256, "problems held out of each code dataset as its benchmark code:<dataset> (0 = none)")


PRESETS = {
    "paper": {},
    "1gpu": dict(model="Qwen/Qwen2.5-1.5B-Instruct", prompts_per_step=32, max_new_tokens=4096,
                 eval_max_new_tokens=4096, max_prompt_tokens=1024, micro_batch_size=4, eval_data="math500,minerva_math",
                 code_heldout=128, eval_every=50),
    "tiny": dict(model="tiny:habits", train_data=["tiny:add", "tiny:lin"], problem_key=["problem"],
                 answer_key=["answer"], prompt_template=["{problem}"], verifiers=["math"], max_prompt_tokens=64,
                 eval_data="tiny_add,tiny_lin", eval_limit=128, eval_every=0, eval_samples=4, eval_temperature=1.0,
                 eval_top_p=1.0, eval_top_k=0, eval_max_new_tokens=48, total_steps=40, s_rl=6, s_opd=4,
                 prompts_per_step=16, group_size=8, max_new_tokens=48, lr=1e-4, weight_decay=0.0, micro_batch_size=64,
                 save_every=20, grader_workers=1, logprob_chunk=4096, diag_prompts=32),
}


# ----------------------------------------------------------------------------------------------------------
# The method: Algorithm 1's schedule, the cross-branch advantage (Eq. delta), the loss, the merge, the diagnostics
# ----------------------------------------------------------------------------------------------------------
def phase_at(step: int, args: Args) -> str:
    """Algorithm 1: cycles of S_RL Phase-I steps ("rl") then S_OPD Phase-II steps ("opd"); the baselines' stages."""
    if args.mode in ("experts", "mixed", "static_opd", "mopd"):
        return "rl" if args.mode in ("experts", "mixed") or step < args.total_steps else "static"
    return "rl" if step % (args.s_rl + args.s_opd) < args.s_rl else "opd"


def teachers_of(k: int, K: int, args: Args) -> list[int]:
    """Whose prompts branch k samples in Phase II, and who scores them: the partner (K = 2); hub and spokes for
    K ≥ 3 (a spoke learns from the hub, the hub from every spoke); static_opd: the frozen other expert; mopd: all."""
    if args.mode == "mopd":
        return list(range(K))
    if args.mode == "static_opd" or K == 2:
        return [1 - k]
    return [j for j in range(K) if j != k] if k == args.hub else [args.hub]


def students_at(phase: str, K: int, args: Args) -> list[int]:
    """The models that update in a phase: every branch (one model in mixed); in the OPD stage of static_opd its
    student, of mopd the fresh student (model K) while the K experts stay frozen."""
    if phase == "static":
        return [K if args.mode == "mopd" else args.static_student]
    return [0] if args.mode == "mixed" else list(range(K))


def batch_plan(k: int, phase: str, K: int, args: Args) -> list[tuple[str, int, int]]:
    """The parts of branch k's batch this step: (kind, dataset, number of prompts). Phase I: P native prompts.
    Phase II: P·(1 − cross_frac) native + P·cross_frac on the teachers' datasets, split equally."""
    P = args.prompts_per_step
    if args.mode == "mixed":  # dataset K: the single pool of every dataset's prompts (load_data)
        return [("native", K, P)] if args.mixed_pool == "single" else [("native", j, P // K) for j in range(K)]
    if phase == "rl":
        return [("native", k, P)]
    teachers = teachers_of(k, K, args)
    cross = P if phase == "static" or not args.phase2_native_rl else round(P * args.cross_frac)
    plan = [("native", k, P - cross)] if cross < P else []
    return plan + [("cross", j, cross // len(teachers)) for j in teachers]


@dataclass
class Part:
    """One part of a branch's batch this step: native rows (group advantage, Eq. rlvr) or cross rows (Eq. delta)."""
    kind: str                                    # "native" or "cross"
    teacher: int                                 # the dataset's branch: for a cross part, the one that scores it
    ro: engines.Rollouts
    batch: common.Batch
    reward: Future | None = None                 # native: the verifier's scores, graded in the background
    correct_B: torch.Tensor | None = None        # native: 1.0 where the verifier accepted the response
    adv_B: torch.Tensor | None = None            # native: the group advantage A_i of each sequence
    teacher_logp_BT: torch.Tensor | None = None  # cross: log π_θj(y_t | x', y_<t), before any branch updates
    old_logp_BT: torch.Tensor | None = None      # π_old of an off-policy (--num-minibatches > 1) update


def cross_advantages(teacher_logp_BT, old_logp_BT, beta: float) -> torch.Tensor:
    """Eq. delta: Â_t = β_k · (log π_θj(y_t) − log π_θk(y_t)) on branch k's own tokens; π_θk's term is the
    rollout-time log-prob, detached, so Â is a fixed per-token reward inside the surrogate."""
    return beta * (teacher_logp_BT - old_logp_BT).detach()


def copd_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, norm, args: Args):
    """One micro-batch of a branch's update: the clipped surrogate with per-token advantages (the group advantage A_i
    on native rows, β·δ_t on cross rows), aggregated over the combined native + cross batch."""
    pg_BT, low_BT, high_BT = common.ppo_clip_loss(logp_BT, old_logp_BT, adv_BT, args.clip_low, args.clip_high)
    return common.agg_loss(pg_BT, mask_BT, args.loss_agg, norm), low_BT, high_BT


def train_branch(model, opt, parts: list[Part], beta: float, vocab: int, args: Args, device) -> dict:
    """Branch k's update over its native + cross parts: --num-minibatches optimizer steps, step u taking the u-th
    share of every part, the loss one --loss-agg mean over both. Returns the branch's metrics."""
    split = [runtime.minibatches(p.batch, args.micro_batch_size, args.num_minibatches) for p in parts]
    if args.num_minibatches > 1:  # off-policy minibatches: the ratio needs the pre-update log-probs
        for p in parts:
            p.old_logp_BT = common.score_logprobs(model, p.batch, vocab, args.temperature, args.micro_batch_size,
                                                  args.logprob_chunk)
    engine_BT = [p.ro.engine_logprobs(p.batch.T, device) for p in parts]  # for the trainer/engine mismatch metric
    meter, cross = runtime.Meter(clock=False), runtime.Meter(clock=False)  # means over all tokens, cross ones
    for u in range(args.num_minibatches):  # optimizer step u: the u-th share of every part's micro-batches
        owners = [(p, e) for p, e, s in zip(parts, engine_BT, split) for _ in s[u]]
        update = [pair for s in split for pair in s[u]]
        for (p, eng_BT), (rows, mb, norm) in zip(owners, runtime.accumulate(update, args.max_new_tokens)):
            logp_BT, ent_BT = common.token_logprobs(model, mb, vocab, args.temperature, args.logprob_chunk)
            old_BT = logp_BT.detach() if p.old_logp_BT is None else p.old_logp_BT[rows, :mb.T]
            adv_BT = p.adv_B[rows, None].expand_as(logp_BT) if p.kind == "native" else \
                cross_advantages(p.teacher_logp_BT[rows, :mb.T], old_BT, beta)  # Eq. rlvr's A_i, or Eq. delta
            loss, low_BT, high_BT = copd_loss(logp_BT, old_BT, adv_BT, mb.mask_BT, norm, args)
            loss.backward()
            with torch.no_grad():
                m_BT = mb.mask_BT
                meter.add({"loss": loss}, divide_by=args.num_minibatches)
                meter.tokens({"entropy": ent_BT * m_BT, "clip_low": low_BT * m_BT, "clip_high": high_BT * m_BT,
                              "logp_diff_mean": (old_BT - eng_BT[rows, :mb.T]).abs() * m_BT})
                if p.kind == "cross":  # −δ = log π_student − log π_teacher on k's tokens: KL_k1(student‖teacher)
                    cross.tokens({"kl_teacher": -(p.teacher_logp_BT[rows, :mb.T] - old_BT) * m_BT})
        runtime.optimizer_step(model, opt, args.max_grad_norm, meter, prefix="")
    comps = [c for p in parts for c in p.ro.comps]
    meter.set({"response_length": sum(len(c.token_ids) for c in comps) / len(comps)})
    native = [p.correct_B for p in parts if p.kind == "native"]
    if native:
        meter.set({"reward": torch.cat(native).mean(), "frac_zero_std": torch.cat(
            [c.view(-1, args.group_size).std(1) == 0 for c in native]).float().mean()})
    tok = float(sum(p.batch.mask_BT.sum() for p in parts))
    tok_cross = float(sum(p.batch.mask_BT.sum() for p in parts if p.kind == "cross"))
    return meter.read(tok) | (cross.read(tok_cross) | {"cross_token_frac": tok_cross / tok} if tok_cross else {})


@torch.no_grad()
def merge_into(target, models: list, weights: list[float]) -> None:
    """θ* = Σ_k w_k θ_k (w_k = 1/K: the paper's "simple parameter merging"), shard by shard: all branches share one
    FSDP2 layout, so each rank averages its own shards with no communication. `target` may be one of `models`."""
    params = [dict(m.named_parameters()) for m in models]
    for name, p in target.named_parameters():
        p.copy_(sum(w * ps[name] for w, ps in zip(weights, params)))


def overlap_and_sym_kl(h_a_NH, head_a, h_b_NH, head_b, vocab: int, k: int, chunk: int):
    """Per response position, the top-k overlap O_k = |top_k(p_a) ∩ top_k(p_b)| / k and the symmetric KL
    KL(p_a‖p_b) + KL(p_b‖p_a) = Σ_v (p_a − p_b)(log p_a − log p_b), over the shared vocabulary, in chunks."""
    def logits(h, head):
        return F.linear(h, head.weight[:vocab], None if head.bias is None else head.bias[:vocab]).float()

    overlap, sym_kl = [], []
    for i in range(0, h_a_NH.shape[0], chunk):
        la_nV, lb_nV = logits(h_a_NH[i:i + chunk], head_a), logits(h_b_NH[i:i + chunk], head_b)
        top_a_nk, top_b_nk = la_nV.topk(k, -1).indices, lb_nV.topk(k, -1).indices
        overlap.append((top_a_nk[:, :, None] == top_b_nk[:, None, :]).any(-1).float().mean(-1))
        pa_nV, pb_nV = la_nV.log_softmax(-1), lb_nV.log_softmax(-1)
        sym_kl.append(((pa_nV.exp() - pb_nV.exp()) * (pa_nV - pb_nV)).sum(-1))
    return torch.cat(overlap), torch.cat(sym_kl)


# ----------------------------------------------------------------------------------------------------------
# Train loop
# ----------------------------------------------------------------------------------------------------------
def per_branch(values: list, K: int, name: str) -> list:
    if len(values) not in (1, K):
        raise ValueError(f"--{name.replace('_', '-')} has {len(values)} values for {K} branches: give one, or one "
                         f"per --train-data")
    return list(values) * K if len(values) == 1 else list(values)


def take(stream, n: int) -> list[dict]:
    """n prompts (over all ranks) from a stream that yields one prompt per rank at a time."""
    return [r for _ in range(n // stream.world) for r in stream.next()]


@dataclass
class Plan:
    """A run's checked shape: the K branches' settings, the merge, the models trained, the loop and its phases."""
    K: int
    problem_key: list[str]
    answer_key: list[str]
    prompt_template: list[str]
    verifiers: list[str]
    beta: list[float]
    weights: list[float]
    n_models: int
    total: int
    phases: set[str]


def plan(args: Args, world: int) -> Plan:
    """Check the flags against each other and the world size; return the run's Plan."""
    K = len(args.train_data)
    keys = {f: per_branch(getattr(args, f), K, f) for f in ("problem_key", "answer_key", "prompt_template",
                                                            "verifiers", "beta")}
    bad = [v for v in keys["verifiers"] + args.eval_verifiers if v not in ("math", "math_tag", "code")]
    if K < 2 or bad:
        raise ValueError(f"CoPD needs K ≥ 2 datasets in --train-data (got {K}) and verifiers 'math', 'math_tag' or "
                         f"'code' (got {bad})")
    if args.eval_verifiers and len(args.eval_verifiers) != len(names := args.eval_data.split(",")):
        raise ValueError(f"--eval-verifiers needs one verifier per --eval-data benchmark ({len(names)}), or none")
    if args.mode == "static_opd" and (K != 2 or args.static_student not in (0, 1)):
        raise ValueError("--mode static_opd is defined for two experts: two --train-data, --static-student 0 or 1")
    if args.static_teacher and (args.mode != "static_opd" or not args.total_steps + args.static_opd_steps):
        raise ValueError("--static-teacher is for --mode static_opd; with --total-steps 0 give --static-opd-steps")
    if K >= 3 and not 0 <= args.hub < K:
        raise ValueError(f"--hub {args.hub} is not a branch (0..{K - 1})")
    if args.diag_prompts % world:
        raise ValueError(f"--diag-prompts {args.diag_prompts} does not divide by the world size {world}")
    T = args.total_steps
    T_opd = args.static_opd_steps or (T if args.mode == "mopd" else round(T * args.s_opd / (args.s_rl + args.s_opd)))
    total = {"mixed": K * T, "static_opd": T + T_opd, "mopd": T + T_opd}.get(args.mode, T)
    n_models = {"mixed": 1, "mopd": K + 1}.get(args.mode, K)  # mopd: the K experts and the student
    if args.mode == "mixed" and args.mixed_pool == "single":  # dataset K, the pool: rows already in their template
        keys["prompt_template"].append("{problem}")
    phases = {phase_at(s, args) for s in range(total)}
    for phase in phases:
        for k in students_at(phase, K, args):
            for kind, j, n in batch_plan(k, phase, K, args):
                if n <= 0 or n % world:
                    raise ValueError(f"branch {k}'s {phase} batch takes {n} {kind} prompts of dataset {j}, which "
                                     f"must be a positive multiple of the world size {world}: adjust "
                                     "--prompts-per-step or --cross-frac")
    return Plan(K, **keys, weights=per_branch(args.merge_weights or [1.0 / K], K, "merge_weights"), n_models=n_models,
                total=total, phases=phases)


def load_data(args: Args, cfg: Plan, d) -> tuple[list, dict, dict]:
    """Every dataset's training rows, the benchmarks by verifier (--eval-data by --eval-verifiers; a code dataset's
    last --code-heldout rows, never trained on) and the prompt streams: one per dataset for native prompts, one per
    (student, teacher) for cross prompts, so that their orders are independent."""
    rows, benches = [], {}
    for (name, b), kind in zip(common.load_benchmarks(args.eval_data, args.eval_data_dir, args.eval_limit).items(),
                               args.eval_verifiers or itertools.repeat("math")):
        benches.setdefault(kind, {})[name] = b
    for k in range(cfg.K):
        r = common.load_problems(args.train_data[k], args.train_split, cfg.problem_key[k], cfg.answer_key[k],
                                 seed=args.seed)
        if cfg.verifiers[k] == "code" and args.code_heldout:
            if len(r) <= args.code_heldout:
                raise ValueError(f"{args.train_data[k]} has {len(r)} problems, not more than --code-heldout "
                                 f"{args.code_heldout}: lower it (0 = no code benchmark)")
            r, benches.setdefault("code", {})[f"code:{args.train_data[k]}"] = r[:-args.code_heldout], r[-args.code_heldout:]
        rows.append([{**x, "branch": k} for x in r])
    if len(cfg.prompt_template) > cfg.K:  # mixed's single pool (dataset K): each row in its own dataset's template
        rows.append([{**x, "problem": cfg.prompt_template[x["branch"]].format(problem=x["problem"])}
                     for r in rows for x in r])
    streams = {f"own{k}": common.PromptStream(rows[k], d.world, d.rank, d.world, args.seed * 1000 + k)
               for k in range(len(rows))}
    for k in range(cfg.n_models):
        for j in {j for ph in cfg.phases if k in students_at(ph, cfg.K, args)
                  for kind, j, _ in batch_plan(k, ph, cfg.K, args) if kind == "cross"}:
            streams[f"cross{k}_{j}"] = common.PromptStream(rows[j], d.world, d.rank, d.world,
                                                           args.seed * 1000 + 100 + 10 * k + j)
    return rows, benches, streams


def diag_pairs(steps_done: int, cfg: Plan, args: Args) -> list[tuple[int, int]]:
    """The pairs compared (O_k, symmetric KL) after `steps_done` steps, at the end of each phase (of each S_RL / S_OPD
    block in the baselines) and of the run: student and teacher, the partners, or hub and spokes; none for one model."""
    cycle = args.s_rl + args.s_opd
    if not args.diag_prompts or cfg.n_models == 1 or (steps_done % cycle not in (0, args.s_rl) and
                                                      steps_done != cfg.total):
        return []
    if args.mode == "static_opd":
        return [(args.static_student, 1 - args.static_student)]
    if args.mode == "mopd":  # the student (model K) and each expert
        return [(cfg.K, j) for j in range(cfg.K)]
    return [(0, 1)] if cfg.K == 2 else [(args.hub, j) for j in range(cfg.K) if j != args.hub]


@torch.no_grad()
def diagnose(branches, engine, tok, rows: list, pairs: list, steps_done: int, cfg: Plan, sampling, vocab: int,
             args: Args, d) -> dict:
    """O_k and symmetric KL between branch pairs over the response positions of both branches' on-policy samples
    (one per prompt) of the first --diag-prompts prompts of every dataset; means over every rank's positions."""
    seqs = {}
    for a in sorted({x for p in pairs for x in p}):
        engines.sync_weights(branches[a], engine, tag=a)
        seqs[a] = [engines.rollout(engine, tok, rows[j][d.rank:args.diag_prompts:d.world], 1, cfg.prompt_template[j],
                                   args.max_prompt_tokens, sampling,
                                   runtime.rollout_seed(args.seed, steps_done, d.rank, salt=500 + 10 * a + j))
                   for j in range(cfg.K)]
    engine.sleep()
    m = {}
    for a, b in pairs:
        o = kl = n = 0.0
        for ro in seqs[a] + seqs[b]:
            for _, mb in ro.batch(tok.pad_token_id, d.device).micro_batches(args.micro_batch_size):
                h_a, h_b = common.response_hidden(branches[a], mb), common.response_hidden(branches[b], mb)
                head_a, head_b = branches[a].get_output_embeddings(), branches[b].get_output_embeddings()
                o_N, kl_N = overlap_and_sym_kl(h_a, head_a, h_b, head_b, vocab, args.overlap_k, args.logprob_chunk)
                o, kl, n = o + o_N.sum().double(), kl + kl_N.sum().double(), n + o_N.numel()
        tot = runtime.all_reduce_mean({"o": float(o), "kl": float(kl), "n": n}, d)
        suffix = "" if len(pairs) == 1 else f"/{a}-{b}"
        m[f"diag/overlap_top{args.overlap_k}{suffix}"] = tot["o"] / max(tot["n"], 1.0)
        m[f"diag/sym_kl{suffix}"] = tot["kl"] / max(tot["n"], 1.0)
    return m


def main(args: Args) -> None:
    d, out, ckpt = runtime.start(args, __file__)

    # --- branches, datasets and verifiers ----------------------------------------------------------------
    cfg = plan(args, d.world)
    base_path = runtime.resolve(args.model, d)
    tok = runtime.load_tokenizer(base_path)
    vocab = len(tok)
    inits = [runtime.resolve(args.static_teacher, d) if args.static_teacher and k != args.static_student else base_path
             for k in range(cfg.n_models)]  # static_opd from a given teacher: its branch starts there
    branches = [runtime.load_model(p, d, trainable=True, vocab=vocab, grad_ckpt=args.grad_checkpointing) for p in inits]
    engine = engines.make_engine(args.rollout, base_path, d, tok, vocab, args)  # one engine, weights pushed per branch
    opts = [torch.optim.AdamW(b.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
            for b in branches]
    rows, benches, streams = load_data(args, cfg, d)
    verify = {kind: verifiers.Grader(args.grader_workers, args.grader_timeout,
                                     "answer_tag" if kind == "math_tag" else args.answer_format)
              for kind in {*cfg.verifiers, *benches} - {"code"}}
    if "code" in cfg.verifiers:
        verify["code"] = verifiers.CodeVerifier(args.code_workers, args.code_timeout, args.code_memory_mb)
    train_sampling = engines.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    eval_sampling = engines.Sampling(args.eval_max_new_tokens, args.eval_temperature, args.eval_top_p, args.eval_top_k)
    names = {f"branch{k}": b for k, b in enumerate(branches)}
    start = 0
    if ckpt:
        state = runtime.load_checkpoint(ckpt, names, dict(zip(names, opts)), d)
        for name, s in state["data"].items():
            streams[name].load_state_dict(s)
        start = state["step"]
    log = runtime.RunLog(out, d, args, start, cfg.total)
    log.print(f"[copd] {out}  mode={args.mode}  K={cfg.K}  world={d.world}  device={d.device.type}  steps {start}->"
              f"{cfg.total}" + (f"  code sandbox: {verify['code'].isolation}" if "code" in verify else ""))
    pool = ThreadPoolExecutor(1)  # rewards of one branch's rollouts are graded while the next branch rolls out

    def push(k: int) -> None:  # branch k into the one engine, unless it holds it (every use ends with rest())
        engines.sync_weights(branches[k], engine, tag=k)

    def rest() -> None:
        engine.sleep()  # free the GPU for scoring and updates (vLLM); a level-2 sleep discards the pushed weights

    def run_eval(step: int, k: int, tag: str = "") -> None:
        push(k)
        res = {}
        for kind, group in benches.items():  # each benchmark graded by its verifier, in its branch's prompt template
            template = cfg.prompt_template[cfg.verifiers.index(kind) if kind in cfg.verifiers else 0]
            res |= engines.evaluate(engine, tok, group, verify[kind], template, args.eval_samples, eval_sampling,
                                    [1, 4, 8, 16, 32], d, args.seed, args.max_prompt_tokens)
        rest()
        log.eval(step, res, tag)

    final = {"static_opd": args.static_student, "mopd": cfg.K}.get(args.mode, 0)  # the model a run delivers
    if start == 0 and cfg.total > 0:
        run_eval(0, final)  # π_0 (only a --static-teacher starts elsewhere)
    for step in range(start, cfg.total):
        meter, metrics = runtime.Meter(), {}  # the step's values and timers; each branch's update has its own meter
        phase = phase_at(step, args)
        students = students_at(phase, cfg.K, args)
        for opt in opts:
            lr = runtime.set_lr(opt, step, args.lr, args.lr_warmup_steps)
        meter.set({"phase": {"rl": 0.0, "opd": 1.0, "static": 2.0}[phase], "lr": lr,
                   "reward/grader_failures": sum(v.take_failures() for k, v in verify.items() if k != "code")})

        # --- rollout: every student samples its batch parts with its own weights; rewards graded in the background
        with meter.time("rollout"):
            parts = {k: [] for k in students}
            for k in students:
                push(k)
                for i, (kind, j, n) in enumerate(batch_plan(k, phase, cfg.K, args)):
                    probs = take(streams[f"own{j}" if kind == "native" else f"cross{k}_{j}"], n)
                    ro = engines.rollout(engine, tok, probs, args.group_size, cfg.prompt_template[j],
                                         args.max_prompt_tokens, train_sampling,
                                         runtime.rollout_seed(args.seed, step, d.rank, salt=1 + 16 * k + i))
                    of_B = [x for x in ro.problems for _ in range(args.group_size)]  # each response's problem
                    reward = pool.submit(verifiers.grade_each, verify, [cfg.verifiers[x["branch"]] for x in of_B],
                                         ro.texts, [x["answer"] for x in of_B]) if kind == "native" else None
                    parts[k].append(Part(kind, j, ro, ro.batch(tok.pad_token_id, d.device), reward))
            rest()

        # --- teachers score the cross batches with their current weights, before any branch updates (Eq. delta)
        with meter.time("teacher"):
            for p in (p for k in students for p in parts[k] if p.kind == "cross"):
                # runtime.score releases the teacher's root, which stays gathered until its own backward otherwise
                p.teacher_logp_BT = runtime.score(branches[p.teacher], p.batch, vocab, args.temperature,
                                                  args.micro_batch_size, args.logprob_chunk)

        # --- reward: verifier accuracy -> group advantages (Eq. rlvr), native parts only
        with meter.time("reward"):
            for p in (p for k in students for p in parts[k] if p.kind == "native"):
                p.correct_B = torch.tensor(p.reward.result())
                p.adv_B = common.group_advantages(p.correct_B.view(-1, args.group_size),
                                                  args.adv_scale).view(-1).to(d.device)

        # --- update: one optimizer step per branch over its native + cross batch, one mean over both
        with meter.time("update"):
            for k in students:
                beta = 1.0 if k == cfg.K else cfg.beta[k]  # mopd's student: Â_t = δ_t, as in MiMo's recipe
                m_k = train_branch(branches[k], opts[k], parts[k], beta, vocab, args, d.device)
                metrics |= {f"branch{k}/{key}": v for key, v in m_k.items()}
                log.samples(step + 1, [{"branch": k, "kind": p.kind, **s} for p in parts[k] for s in p.ro.samples(
                    [None] * len(p.ro.texts) if p.correct_B is None else p.correct_B.tolist(), args.log_samples)])
        for key, name in (("reward", "reward/mean"), ("kl_teacher", "kl/teacher"), ("loss", "loss/total"),
                          ("response_length", "response/mean_length"), ("entropy", "policy/entropy")):
            if vals := [metrics[f"branch{k}/{key}"] for k in students if f"branch{k}/{key}" in metrics]:
                metrics[name] = sum(vals) / len(vals)

        # --- diagnostics at the end of each phase (and of each S_RL / S_OPD block in the baselines)
        with meter.time("diag"):
            if pairs := diag_pairs(step + 1, cfg, args):
                metrics |= diagnose(branches, engine, tok, rows, pairs, step + 1, cfg, train_sampling, vocab, args, d)
        metrics |= meter.read()  # no token sums in the step's own meter
        metrics["perf/tokens_per_s"] = sum(p.ro.num_tokens for k in students for p in parts[k]) / \
            metrics["timing_s/step"]
        log.metrics(step + 1, runtime.all_reduce_mean(metrics, d), show=("reward/mean", "kl/teacher", "phase"))

        # --- eval, then checkpoint (so that a checkpoint implies its step's eval is logged)
        stage_end = args.mode == "static_opd" and step + 1 == args.total_steps
        if (args.eval_every and (step + 1) % args.eval_every == 0 or stage_end) and step + 1 < cfg.total:
            for k in range(cfg.n_models):
                run_eval(step + 1, k, tag="" if cfg.n_models == 1 else f"branch{k}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < cfg.total:
            runtime.save_checkpoint(out, step + 1, names, dict(zip(names, opts)),
                                    {"data": {n: s.state_dict() for n, s in streams.items()}}, d, args.keep_checkpoints)

    # --- final: every branch saved and evaluated, then the final model (the merge, or the single model)
    if cfg.n_models > 1:
        for k in range(cfg.K):  # the branches, or the experts (mopd's student is the final model)
            runtime.save_hf(branches[k], tok, out / "branches" / f"branch{k}", d)
            run_eval(cfg.total, k, tag=f"branch{k}")
    if args.mode in ("copd", "experts"):
        merge_into(branches[0], branches, cfg.weights)
    runtime.save_hf(branches[final], tok, out / "final", d)
    run_eval(cfg.total, final)
    log.close(("reward/mean", "kl/teacher", f"diag/overlap_top{args.overlap_k}", "diag/sym_kl", "response/mean_length"))
    pool.shutdown()
    for v in verify.values():
        v.close()
    log.print(f"[copd] done: {out}")
    runtime.finish()


if __name__ == "__main__":
    # plan() checks each batch's prompt counts against the world size itself (--prompts-per-step is split per dataset)
    main(cli.parse_args(Args, PRESETS, check=lambda a: plan(a, cli.world_size()), per_step=()))
