"""Shared, paper-agnostic pieces of the tandem scripts: GRPO/KD math, token log-probs and KLs in chunks, batches,
data, evaluation summaries. The verifiers (math answers, sandboxed code) are in `verifiers.py`, the command line
in `cli.py`, the run-time plumbing (distributed, FSDP2, the update skeleton, logging, checkpoints) in `runtime.py`,
the rollout engines and evaluation in `engines.py`. No paper's objective lives in any of them: each script shows
its own.

Tensor names carry shape suffixes: P prompts, G completions per prompt, B sequences (= P*G on a rank),
T tokens (prompt + response, right-padded), V vocabulary, N response tokens flattened, H hidden size.
"""

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from verifiers import normalize_answer

# ----------------------------------------------------------------------------------------------------------
# 1. GRPO / KD math on per-token tensors
# ----------------------------------------------------------------------------------------------------------
def group_advantages(rewards_PG: torch.Tensor, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_G r) / (std_G r + eps); Dr. GRPO (`scale="none"`): A_i = r_i - mean_G r."""
    centered_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if scale == "none":
        return centered_PG
    if scale != "std":
        raise ValueError(f"unknown advantage scale {scale!r}; use 'std' (GRPO) or 'none' (Dr. GRPO)")
    std_P1 = rewards_PG.std(dim=1, keepdim=True) if rewards_PG.shape[1] > 1 else torch.zeros_like(rewards_PG[:, :1])
    return centered_PG / (std_P1 + eps)


def ppo_clip_loss(logp_BT, old_logp_BT, adv_BT, clip_low: float, clip_high: float):
    """PPO-clip surrogate with separate low/high clip (DAPO clip-higher). Returns the per-token loss
    -min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A) and the boolean maps of tokens clipped low and high."""
    # The log-ratio is clamped to ±20 before exp (as verl does): on-policy it is 0 and nothing changes, and a token
    # with a runaway ratio and a negative advantage can no longer put a 1e10 loss and gradient into the step.
    ratio_BT = torch.exp((logp_BT - old_logp_BT).clamp(-20.0, 20.0))
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    with torch.no_grad():
        low_BT = (ratio_BT < 1.0 - clip_low) & (adv_BT < 0)
        high_BT = (ratio_BT > 1.0 + clip_high) & (adv_BT > 0)
    return loss_BT, low_BT, high_BT


def truncated_is_weights(logp_target_BT, logp_behavior_BT, cap: float) -> torch.Tensor:
    """Token-level truncated importance weights min(pi_target / pi_behavior, cap), detached (TIS)."""
    return torch.exp(logp_target_BT - logp_behavior_BT).clamp(max=cap).detach()


def kl_estimate(logp_BT, ref_logp_BT, kind: str) -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) on tokens sampled from pi (http://joschu.net/blog/kl-approx.html).
    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r, with log r = logp - ref_logp. k1 and k2 are exact
    at any log-ratio, so the tokens where the two models disagree most keep their full gradient; only k3's
    exponential is guarded (its argument clamped at 20, where it would otherwise overflow)."""
    log_r_BT = logp_BT - ref_logp_BT
    if kind == "k1":
        return log_r_BT
    if kind == "k2":
        return 0.5 * log_r_BT ** 2
    if kind == "k3":
        return torch.exp((-log_r_BT).clamp(max=20.0)) - 1.0 + log_r_BT
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def kl_from_logits(logits_p_NV, logits_q_NV) -> torch.Tensor:
    """Exact KL(p || q) per row over the full vocabulary, from logits (computed in float32)."""
    logp_NV, logq_NV = logits_p_NV.float().log_softmax(-1), logits_q_NV.float().log_softmax(-1)
    return (logp_NV.exp() * (logp_NV - logq_NV)).sum(-1)


LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def agg_loss(loss_BT, mask_BT, mode: str, norm: "LossNorm") -> torch.Tensor:
    """Reduce a micro-batch's per-token loss to a scalar such that summing over micro-batches, then averaging
    over ranks (as FSDP does with gradients), gives exactly the `mode` mean over the whole global batch:
      token-mean               sum_bt l*m / (global #tokens)                  (DAPO; TRL "dapo", verl default)
      seq-mean-token-mean      mean_b [ sum_t l*m / #tokens_b ]               (original GRPO)
      seq-mean-token-sum-norm  mean_b [ sum_t l*m / max_new_tokens ]          (Dr. GRPO)"""
    if mode == "token-mean":
        return (loss_BT * mask_BT).sum() / norm.tokens
    if mode == "seq-mean-token-mean":
        return ((loss_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1)).sum() / norm.seqs
    if mode == "seq-mean-token-sum-norm":
        return ((loss_BT * mask_BT).sum(1) / norm.max_len).sum() / norm.seqs
    raise ValueError(f"unknown loss aggregation {mode!r}; use one of {LOSS_AGGS}")


@dataclass
class LossNorm:
    """Denominators of `agg_loss` for one optimizer step: global counts divided by the world size."""
    tokens: float
    seqs: float
    max_len: int

    @staticmethod
    def of(masks: list[torch.Tensor], max_len: int) -> "LossNorm":
        """From the response masks of all micro-batches of one optimizer step on this rank."""
        import torch.distributed as dist
        counts = torch.tensor([sum(m.sum().item() for m in masks), float(sum(m.shape[0] for m in masks))],
                              dtype=torch.float64)
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            counts = counts.to(masks[0].device)
            dist.all_reduce(counts)
        return LossNorm(tokens=max(counts[0].item(), 1.0) / world, seqs=counts[1].item() / world, max_len=max_len)


# ----------------------------------------------------------------------------------------------------------
# 2. Token log-probs and full-vocabulary KLs, computed from hidden states in chunks of tokens
# ----------------------------------------------------------------------------------------------------------
# A [B, T, V] logits tensor at V = 151,936 is 4.9 GB per 8K tokens in float32; two models' worth is what OOMs
# distillation runs. So the model runs without its LM head (`logits_to_keep=1`), the final hidden states of the
# positions that predict response tokens are gathered to [N, H], and the head + log-softmax run on `chunk`
# tokens at a time, recomputed in backward, so that only [chunk, V] ever exists. Both the log-probs of given
# tokens and the full-vocabulary KLs are autograd Functions that keep one logsumexp per token from forward, recompute
# a chunk's logits in backward, turn them into their gradient in place, and sum the head's gradient over the chunks
# into one float32 buffer: one or two float32 [chunk, V] tensors live at a time, never a per-chunk [V, H].

@dataclass
class Batch:
    """Prompt + response token ids, right-padded: `ids_BT`; 1.0 on response tokens (the policy's actions):
    `mask_BT`. Every per-token tensor of a step lives on this same [B, T] grid."""
    ids_BT: torch.Tensor
    mask_BT: torch.Tensor

    @staticmethod
    def of(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> "Batch":
        T = max(len(p) + len(r) for p, r in zip(prompts, responses))
        ids_BT = torch.full((len(prompts), T), pad_id, dtype=torch.long)
        mask_BT = torch.zeros((len(prompts), T))
        for b, (p, r) in enumerate(zip(prompts, responses)):
            ids_BT[b, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            mask_BT[b, len(p):len(p) + len(r)] = 1.0
        return Batch(ids_BT.to(device), mask_BT.to(device))

    def micro_batches(self, size: int):
        """(row slice, micro-batch trimmed to its own longest sequence) pairs; index [B, T] tensors with
        `x_BT[rows, :mb.T]`."""
        # a row ends right after its last response token (prompt and response are contiguous, pads after)
        end_B = torch.where(self.mask_BT.any(1), self.T - self.mask_BT.flip(1).argmax(1), 1)
        for i in range(0, self.ids_BT.shape[0], size):
            rows = slice(i, i + size)
            T = int(end_B[rows].max())
            yield rows, Batch(self.ids_BT[rows, :T], self.mask_BT[rows, :T])

    @property
    def T(self) -> int:
        return self.ids_BT.shape[1]


def response_hidden(model, batch: Batch) -> torch.Tensor:
    """Final (normed) hidden states [N, H] at the positions whose next token is a response token."""
    captured = {}

    def grab(module, args, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    handle = model.get_decoder().register_forward_hook(grab)
    try:
        # Right padding needs no attention mask: causal attention never looks at the pads after a sequence,
        # and the positions 0..len-1 match the rollout engine's. `logits_to_keep=1` skips the full LM head.
        model(input_ids=batch.ids_BT, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    h_BTH = captured["h"]
    return h_BTH[:, :-1][batch.mask_BT[:, 1:].bool()]


def response_grid(prompts: list[list[int]], values: list[list[float]], T: int, device) -> torch.Tensor:
    """Per-response-token values (e.g. a rollout engine's log-probs) placed on the [B, T] grid of `Batch.of`."""
    x_BT = torch.zeros((len(prompts), T))
    for b, (p, v) in enumerate(zip(prompts, values)):
        x_BT[b, len(p):len(p) + len(v)] = torch.tensor(v, dtype=torch.float32)
    return x_BT.to(device)


def response_targets(batch: Batch) -> torch.Tensor:
    return batch.ids_BT[:, 1:][batch.mask_BT[:, 1:].bool()]


def to_grid(x_N: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Scatter per-response-token values [N] back onto the batch's [B, T] grid (zeros elsewhere)."""
    sel = batch.mask_BT[:, 1:].bool()
    return F.pad(torch.zeros(sel.shape, dtype=x_N.dtype, device=x_N.device).masked_scatter(sel, x_N), (1, 0))


def _logits(h_nH, weight, bias, vocab: int, temperature: float = 1.0) -> torch.Tensor:
    """A fresh float32 [n, vocab] tensor of logits / temperature, free to be overwritten in place."""
    # Qwen pads the embedding past len(tokenizer): those ids are never real tokens, so the head is sliced to them
    z_nV = F.linear(h_nH, weight[:vocab], None if bias is None else bias[:vocab]).float()
    return z_nV if temperature == 1.0 else z_nV.div_(temperature)


class _HeadGrads:
    """The gradients of h [N, H] and of the head's weight and bias from the logits' gradient of each chunk: the
    products in the weights' dtype (bf16 on GPUs), the head's sums over chunks in one float32 buffer per call (not a
    [V, H] tensor per chunk)."""

    def __init__(self, ctx, h_NH, weight, bias):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        self.weight, self.bias = weight, bias
        self.h = torch.empty_like(h_NH) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        self.b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None

    def add(self, i: int, gz_nV, h_nH) -> None:
        V = gz_nV.shape[1]
        if self.h is not None:
            self.h[i:i + len(gz_nV)] = gz_nV.to(self.weight.dtype) @ self.weight[:V]
        if self.w is not None:
            gzt_Vn = gz_nV.t().to(h_nH.dtype)
            if h_nH.dtype == torch.float32:
                self.w[:V].addmm_(gzt_Vn, h_nH)
            else:
                self.w[:V] += gzt_Vn @ h_nH
        if self.b is not None:
            self.b[:V] += gz_nV.sum(0)

    def result(self) -> tuple:
        return (self.h, None if self.w is None else self.w.to(self.weight.dtype),
                None if self.b is None else self.b.to(self.bias.dtype))


class _TokenLogprobs(torch.autograd.Function):
    """log π(y_n | s_n) = z_n[y_n] − logsumexp(z_n), z_n = (W h_n + b)[:vocab] / T, and the entropy of π(· | s_n), one
    chunk of tokens at a time. Forward keeps only logsumexp per token; backward recomputes a chunk's logits and
    overwrites them with their gradient g_n (1[v = y_n] − π(v | s_n)) / T, so that one float32 [chunk, V] tensor
    lives at a time. The entropy is for metrics: no gradient flows through it, and without `entropy` (a teacher's or
    reference's scores) its three passes over each [chunk, V] tensor are skipped and it is empty."""

    @staticmethod
    def forward(ctx, h_NH, weight, bias, targets_N, vocab: int, temperature: float, chunk: int, entropy: bool):
        logp_N, ent_N, lse_N = (h_NH.new_empty(h_NH.shape[0] if k else 0, dtype=torch.float32)
                                for k in (True, entropy, True))
        for i in range(0, h_NH.shape[0], chunk):
            z_nV = _logits(h_NH[i:i + chunk], weight, bias, vocab, temperature)
            lse_n = z_nV.logsumexp(-1)
            logp_N[i:i + chunk] = z_nV.gather(1, targets_N[i:i + chunk, None]).squeeze(1) - lse_n
            if entropy:
                logp_nV = z_nV.sub_(lse_n[:, None])
                ent_N[i:i + chunk] = -logp_nV.exp().mul_(logp_nV).sum(-1)
            lse_N[i:i + chunk] = lse_n
        ctx.save_for_backward(h_NH, weight, bias, targets_N, lse_N)
        ctx.vocab, ctx.temperature, ctx.chunk = vocab, temperature, chunk
        ctx.mark_non_differentiable(ent_N)
        return logp_N, ent_N

    @staticmethod
    def backward(ctx, g_N, _):
        h_NH, weight, bias, targets_N, lse_N = ctx.saved_tensors
        grads = _HeadGrads(ctx, h_NH, weight, bias)
        for i in range(0, h_NH.shape[0], ctx.chunk):
            h_nH, g_n = h_NH[i:i + ctx.chunk], g_N[i:i + ctx.chunk, None].float()
            z_nV = _logits(h_nH, weight, bias, ctx.vocab, ctx.temperature)
            gz_nV = z_nV.sub_(lse_N[i:i + ctx.chunk, None]).exp_().mul_(-g_n)       # −g π
            gz_nV.scatter_add_(1, targets_N[i:i + ctx.chunk, None], g_n)             # + g 1[v = y]
            grads.add(i, gz_nV if ctx.temperature == 1.0 else gz_nV.div_(ctx.temperature), h_nH)
        return *grads.result(), None, None, None, None, None


def logprobs_from_hidden(h_NH, head, targets_N, vocab: int, temperature: float = 1.0, chunk: int = 1024,
                         entropy: bool = True):
    """log pi(y_n | s_n) [N] of the given tokens, and the entropy of pi(. | s_n) [N] (detached, for metrics; None
    without `entropy`)."""
    logp_N, ent_N = _TokenLogprobs.apply(h_NH, head.weight, head.bias, targets_N, vocab, temperature, chunk, entropy)
    return logp_N, ent_N.detach() if entropy else None


class _FullKL(torch.autograd.Function):
    """Exact KL per position over the vocabulary between π = softmax(W h + b) (gradient) and a reference π_ref (none),
    one chunk at a time, log-probs recomputed in backward from the saved logsumexps:
    reverse KL(π ‖ π_ref): dKL/dz = π (log π − log π_ref − KL);  forward KL(π_ref ‖ π): dKL/dz = π − π_ref."""

    @staticmethod
    def forward(ctx, h_NH, weight, bias, h_ref_NH, w_ref, b_ref, vocab: int, reverse: bool, chunk: int):
        kl_N, lse_N, lse_ref_N = (h_NH.new_empty(h_NH.shape[0], dtype=torch.float32) for _ in range(3))
        for i in range(0, h_NH.shape[0], chunk):
            z_nV = _logits(h_NH[i:i + chunk], weight, bias, vocab)
            zr_nV = _logits(h_ref_NH[i:i + chunk], w_ref, b_ref, vocab)
            lse_N[i:i + chunk], lse_ref_N[i:i + chunk] = z_nV.logsumexp(-1), zr_nV.logsumexp(-1)
            logp_nV, logq_nV = z_nV.sub_(lse_N[i:i + chunk, None]), zr_nV.sub_(lse_ref_N[i:i + chunk, None])
            # in place, left to right: the difference reads both log-probs before one is exponentiated
            if reverse:   # Σ_v π (log π − log π_ref)
                d_nV, w_nV = logq_nV.neg_().add_(logp_nV), logp_nV.exp_()
            else:         # Σ_v π_ref (log π_ref − log π)
                d_nV, w_nV = logp_nV.neg_().add_(logq_nV), logq_nV.exp_()
            kl_N[i:i + chunk] = d_nV.mul_(w_nV).sum(-1)
        ctx.save_for_backward(h_NH, weight, bias, h_ref_NH, w_ref, b_ref, lse_N, lse_ref_N, kl_N)
        ctx.vocab, ctx.reverse, ctx.chunk = vocab, reverse, chunk
        return kl_N

    @staticmethod
    def backward(ctx, g_N):
        h_NH, weight, bias, h_ref_NH, w_ref, b_ref, lse_N, lse_ref_N, kl_N = ctx.saved_tensors
        grads, c = _HeadGrads(ctx, h_NH, weight, bias), ctx.chunk
        for i in range(0, h_NH.shape[0], c):
            h_nH, g_n = h_NH[i:i + c], g_N[i:i + c, None].float()
            logp_nV = _logits(h_nH, weight, bias, ctx.vocab).sub_(lse_N[i:i + c, None])
            logq_nV = _logits(h_ref_NH[i:i + c], w_ref, b_ref, ctx.vocab).sub_(lse_ref_N[i:i + c, None])
            if ctx.reverse:
                d_nV = logq_nV.neg_().add_(logp_nV).sub_(kl_N[i:i + c, None])
                gz_nV = d_nV.mul_(logp_nV.exp_()).mul_(g_n)
            else:
                gz_nV = logp_nV.exp_().sub_(logq_nV.exp_()).mul_(g_n)
            grads.add(i, gz_nV, h_nH)
        return *grads.result(), None, None, None, None, None, None


def kl_from_hidden(h_NH, head, h_ref_NH, head_ref, vocab: int, direction: str, chunk: int = 1024):
    """Exact per-position KL over the shared vocabulary between the model (grad) and a reference (no grad):
    `reverse` = KL(pi || pi_ref) (on-policy distillation), `forward` = KL(pi_ref || pi) (supervised KD)."""
    if direction not in ("reverse", "forward"):
        raise ValueError(f"unknown KL direction {direction!r}; use 'reverse' or 'forward'")
    b_ref = None if head_ref.bias is None else head_ref.bias.detach()
    return _FullKL.apply(h_NH, head.weight, head.bias, h_ref_NH.detach(), head_ref.weight.detach(), b_ref, vocab,
                         direction == "reverse", chunk)


def token_logprobs(model, batch: Batch, vocab: int, temperature: float = 1.0, chunk: int = 1024,
                   entropy: bool = True):
    """[B, T] log-probs of the response tokens under `model` (zeros off the response) and [B, T] entropies (None
    without `entropy`)."""
    h_NH = response_hidden(model, batch)
    logp_N, ent_N = logprobs_from_hidden(h_NH, model.get_output_embeddings(), response_targets(batch), vocab,
                                         temperature, chunk, entropy)
    return to_grid(logp_N, batch), None if ent_N is None else to_grid(ent_N, batch)


@torch.no_grad()
def score_logprobs(model, batch: Batch, vocab: int, temperature: float, micro_batch_size: int,
                   chunk: int = 1024) -> torch.Tensor:
    """[B, T] log-probs of the response tokens under `model` as it is now, without gradient, one micro-batch at a
    time: the pre-update π_old of a multi-minibatch update, or a frozen / partner model's scores."""
    out_BT = torch.zeros_like(batch.mask_BT)
    for rows, mb in batch.micro_batches(micro_batch_size):
        out_BT[rows, :mb.T] = token_logprobs(model, mb, vocab, temperature, chunk, entropy=False)[0]
    return out_BT


# ----------------------------------------------------------------------------------------------------------
# 3. Data: problems from the toy world, a local jsonl file or folder, or the hub
# ----------------------------------------------------------------------------------------------------------
_DAPO_HEAD = re.compile(r"^Solve the following math problem step by step\..*?\n\n", re.S)
_DAPO_TAIL = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")


def strip_dapo_wrapper(problem: str) -> str:
    """The bare problem of a DAPO-Math-17k row: DAPO wraps each problem in an instruction to end with "Answer: ...",
    which contradicts a \\boxed{} prompt template. Other problems pass unchanged."""
    return _DAPO_TAIL.sub("", _DAPO_HEAD.sub("", problem)).strip()


def first_line(e: Exception) -> str:
    """The first non-empty line of an exception's message (or its type): the "why" of a one-line error."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def load_problems(source: str, split: str = "train", problem_key: str = "problem", answer_key: str = "answer",
                  limit: int = 0, seed: int = 0, instead: str = "a local .jsonl file") -> list[dict]:
    """Rows {"problem", "answer", ...} from `tiny:<families>`, a .jsonl file, or a hub dataset `org/name[:config]`.
    `limit` keeps the first rows (the toy world generates exactly `limit`, default 512). A hub dataset that cannot
    be loaded stops the run with one line naming it and the ways out, `instead` first."""
    if source.startswith("tiny:"):
        import tiny
        return tiny.make_split(source[5:], "test" if split == "test" else "train", limit or 512, seed)
    if source.endswith(".jsonl"):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data file {source} does not exist")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        import datasets
        name, _, config = source.partition(":")
        try:
            rows = list(datasets.load_dataset(name, config or None, split=split))
        except Exception as e:  # one line, no traceback: the dataset, why, and the ways out
            raise SystemExit(f"error: could not load dataset {source!r} (split {split!r}): {first_line(e)}. Use {instead}, "
                             f"point HF_HOME at a hub cache that holds it (HF_HUB_OFFLINE=1 without network), or run "
                             f"the toy world with --preset tiny") from None
    if not rows:
        raise ValueError(f"dataset {source!r} split {split!r} is empty")
    missing = [k for k in (problem_key, answer_key) if k not in rows[0]]
    if missing:
        raise KeyError(f"dataset {source!r} has no column {missing[0]!r} (columns: {sorted(rows[0])}); "
                       f"pass --problem-key / --answer-key to name the right ones")
    rows = [{**r, "problem": str(r[problem_key]), "answer": str(r[answer_key])} for r in rows]
    return rows[:limit] if limit else rows


def encode_prompt(tokenizer, problem: str, template: str, max_tokens: int = 0, chat: bool = True) -> list[int]:
    """Token ids of the prompt: `template` with {problem} filled in, as one user message of the tokenizer's chat
    template, or (`chat=False`) as the raw prompt text, the way base-model templates such as R1-Zero's are used."""
    text = template.format(problem=problem)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=not chat).input_ids  # raw text: the tokenizer's BOS, if it has one
    return ids[-max_tokens:] if max_tokens and len(ids) > max_tokens else ids


class PromptStream:
    """Shuffled epochs over the training problems. Each step takes the next `per_step` rows of the global order,
    and rank r keeps rows r, r+world, ...: the global batch is the same whatever the world size, and all G
    completions of a prompt stay on one rank. Its position is checkpointed so that --resume continues exactly."""

    def __init__(self, rows: list[dict], per_step: int, rank: int, world: int, seed: int):
        if per_step % world:
            raise ValueError(f"--prompts-per-step {per_step} does not divide by the world size {world}; "
                             f"use a multiple of {world}")
        if len(rows) < per_step:
            raise ValueError(f"the training set has {len(rows)} problems, fewer than --prompts-per-step {per_step}")
        self.rows, self.per_step, self.rank, self.world, self.seed = rows, per_step, rank, world, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def next(self) -> list[dict]:
        if self.pos + self.per_step > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm()
        idx = self._order[self.pos:self.pos + self.per_step]
        self.pos += self.per_step
        return [self.rows[i] for i in idx[self.rank::self.world]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm()


# ----------------------------------------------------------------------------------------------------------
# 4. Evaluation: avg@n with its standard error, unbiased pass@k, maj@n and response length per benchmark
# ----------------------------------------------------------------------------------------------------------
BENCHMARKS = {  # name -> (hub dataset, split, problem column, answer column); the file DIR/<name>.jsonl wins
    "math500": ("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    "aime24": ("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": ("math-ai/aime25", "test", "problem", "answer"),
    "hmmt25": ("MathArena/hmmt_feb_2025", "train", "problem", "answer"),  # HMMT February 2025, 30 problems
    "amc23": ("math-ai/amc23", "test", "question", "answer"),
    "minerva_math": ("math-ai/minervamath", "test", "question", "answer"),
    "olympiadbench": ("math-ai/olympiadbench", "test", "question", "final_answer"),
    "gsm8k": ("openai/gsm8k:main", "test", "question", "answer"),
}


def load_benchmarks(spec: str, data_dir: str = "", limit: int = 0) -> dict[str, list[dict]]:
    """`spec` is comma-separated: benchmark names (from `data_dir`/<name>.jsonl if present, else the hub),
    .jsonl paths, or `tiny_<family>` (the toy world's held-out problems of one task family)."""
    out = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item.startswith("tiny_"):
            out[item] = load_problems(f"tiny:{item[5:]}", "test", limit=limit or 128)
        elif item.endswith(".jsonl"):
            out[Path(item).stem] = load_problems(item, limit=limit)
        elif data_dir and (Path(data_dir) / f"{item}.jsonl").exists():
            out[item] = load_problems(str(Path(data_dir) / f"{item}.jsonl"), limit=limit)
        elif item in BENCHMARKS:
            hub, split, pk, ak = BENCHMARKS[item]
            out[item] = load_problems(hub, split, pk, ak, limit=limit,
                                      instead=f"--eval-data-dir DIR with {item}.jsonl in it")
        else:
            raise ValueError(f"unknown benchmark {item!r}: use one of {sorted(BENCHMARKS)}, a .jsonl path, "
                             f"tiny_<family>, or put {item}.jsonl in --eval-data-dir")
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def summarize_eval(per_problem: list[dict], ks: list[int]) -> dict:
    """Benchmark metrics from per-problem records {"correct": [0/1]*n, "answers": [str|None]*n,
    "lengths": [int]*n}: avg@n, its standard error avg@n_se, pass@k for each k <= n, maj@n (majority vote over
    extracted answers), length. avg@n_se is the standard error of the mean over problems of each problem's mean
    accuracy a_p: sqrt(Σ_p (a_p − avg@n)² / (P − 1)) / sqrt(P) (sample std, ddof = 1), the ± that the
    Sparse-to-Dense and CoPD papers report; it counts the spread over problems and over the n samples within them,
    not over training seeds. With one problem there is no spread to estimate: avg@n_se is None (null in JSON)."""
    n, P = len(per_problem[0]["correct"]), len(per_problem)
    acc_P = [sum(p["correct"]) / n for p in per_problem]
    avg = sum(acc_P) / P
    out = {f"avg@{n}": avg,
           f"avg@{n}_se": math.sqrt(sum((a - avg) ** 2 for a in acc_P) / (P - 1) / P) if P > 1 else None}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(n, sum(p["correct"]), k) for p in per_problem) / len(per_problem)
    maj = 0.0
    for p in per_problem:
        votes = Counter(normalize_answer(a) for a in p["answers"] if a is not None)
        if votes:
            top = votes.most_common(1)[0][0]
            maj += next(c for a, c in zip(p["answers"], p["correct"]) if a is not None and normalize_answer(a) == top)
    out[f"maj@{n}"] = maj / len(per_problem)
    out["mean_length"] = sum(sum(p["lengths"]) / n for p in per_problem) / len(per_problem)
    return out
