"""common.py's GRPO/KD math against slow, obviously correct loop references on random inputs."""

import itertools
import math

import pytest
import torch

import common

torch.manual_seed(0)


def test_group_advantages_match_loop():
    r = torch.rand(5, 8).round()
    r[0] = 1.0  # a group with zero std: advantages must be 0, not NaN
    ref = torch.zeros_like(r)
    ref_dr = torch.zeros_like(r)
    for p in range(5):
        mean = sum(r[p].tolist()) / 8
        std = math.sqrt(sum((x - mean) ** 2 for x in r[p].tolist()) / 7)
        for g in range(8):
            ref[p, g] = (r[p, g] - mean) / (std + 1e-6)
            ref_dr[p, g] = r[p, g] - mean
    torch.testing.assert_close(common.group_advantages(r), ref)
    torch.testing.assert_close(common.group_advantages(r, "none"), ref_dr)
    assert common.group_advantages(r)[0].abs().max() == 0


def test_ppo_clip_loss_matches_loop():
    logp, old = torch.randn(4, 6) * 0.3, torch.randn(4, 6) * 0.3
    adv = torch.randn(4, 6)
    loss, low, high = common.ppo_clip_loss(logp, old, adv, 0.2, 0.28)
    for b, t in itertools.product(range(4), range(6)):
        rho = math.exp(logp[b, t] - old[b, t])
        a = adv[b, t].item()
        want = -min(rho * a, min(max(rho, 0.8), 1.28) * a)
        assert abs(loss[b, t].item() - want) < 1e-5
        assert bool(low[b, t]) == (rho < 0.8 and a < 0)
        assert bool(high[b, t]) == (rho > 1.28 and a > 0)


def test_ppo_clip_loss_is_bounded_at_runaway_ratios_and_exact_on_policy():
    """A negative advantage with a log-ratio of 25 gave a loss and gradient of 7e10; the log-ratio is clamped at ±20
    (as in verl), which leaves the on-policy value and gradient (ratio 1) exactly as they were."""
    logp = torch.tensor([[25.0, -25.0, 0.0, 19.0]], requires_grad=True)
    old, adv = torch.zeros(1, 4), torch.tensor([[-1.0, 1.0, -1.0, -1.0]])
    loss, _, _ = common.ppo_clip_loss(logp, old, adv, 0.2, 0.2)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and loss.max() <= math.exp(20.0) * 1.0001
    assert logp.grad[0, 0] == 0 and torch.isfinite(logp.grad).all()           # past the clamp: no push at all
    assert loss[0, 2].item() == 1.0 and logp.grad[0, 2].item() == 1.0         # on-policy: -A·ρ, d/dlogp = -A·ρ
    assert abs(loss[0, 3].item() - math.exp(19.0)) / math.exp(19.0) < 1e-5    # inside the clamp: unchanged


def test_kl_estimators_keep_exact_gradients_at_extreme_log_ratios():
    """k1 and k2 are exact at any log-ratio (a ±20 clamp made KDRL's k2 gradient vanish exactly where student and
    teacher disagree most); k3 stays finite where its exponential would overflow."""
    for delta in (25.0, -25.0, 100.0, -100.0):
        for kind, want in (("k1", 1.0), ("k2", delta)):
            lp = torch.tensor([delta], requires_grad=True)
            common.kl_estimate(lp, torch.zeros(1), kind).sum().backward()
            assert lp.grad.item() == pytest.approx(want), (kind, delta)
        lp = torch.tensor([delta], requires_grad=True)
        k3 = common.kl_estimate(lp, torch.zeros(1), "k3")
        k3.sum().backward()
        assert torch.isfinite(k3).all() and torch.isfinite(lp.grad).all(), delta
        if delta > 0:  # no overflow there: the exact value and gradient 1 - e^-δ
            assert k3.item() == pytest.approx(math.exp(-delta) - 1 + delta) and lp.grad.item() == pytest.approx(1.0)


def test_truncated_is_weights_match_loop():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    w = common.truncated_is_weights(a, b, 2.0)
    for i, j in itertools.product(range(3), range(5)):
        assert abs(w[i, j].item() - min(math.exp(a[i, j] - b[i, j]), 2.0)) < 1e-5
    assert not w.requires_grad


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_match_formulas(kind):
    lp, ref = torch.randn(3, 7), torch.randn(3, 7)
    got = common.kl_estimate(lp, ref, kind)
    for i, j in itertools.product(range(3), range(7)):
        x = (lp[i, j] - ref[i, j]).item()
        want = {"k1": x, "k2": 0.5 * x * x, "k3": math.exp(-x) - 1 + x}[kind]
        assert abs(got[i, j].item() - want) < 1e-4


def test_kl_estimators_are_unbiased_where_they_should_be():
    """E_p[k1] = E_p[k3] = KL(p||q) on samples from p: the estimators are what their names say."""
    lp, lq = torch.randn(6).log_softmax(0), torch.randn(6).log_softmax(0)
    exact = (lp.exp() * (lp - lq)).sum()
    for kind in ("k1", "k3"):
        expect = (lp.exp() * common.kl_estimate(lp, lq, kind)).sum()
        torch.testing.assert_close(expect, exact, atol=1e-5, rtol=1e-5)


def test_kl_from_logits_matches_loop():
    p, q = torch.randn(4, 9), torch.randn(4, 9)
    got = common.kl_from_logits(p, q)
    for i in range(4):
        pp, qq = p[i].softmax(0).tolist(), q[i].softmax(0).tolist()
        assert abs(got[i].item() - sum(a * math.log(a / b) for a, b in zip(pp, qq))) < 1e-5


@pytest.mark.parametrize("mode", common.LOSS_AGGS)
def test_agg_loss_over_micro_batches_and_ranks_equals_global_mean(mode):
    """Two 'ranks' x three micro-batches, summed per rank and averaged over ranks (as FSDP averages gradients),
    equal the plain global formula."""
    loss = torch.randn(12, 10)
    mask = (torch.rand(12, 10) > 0.3).float()
    mask[:, 0] = 1
    if mode == "token-mean":
        want = (loss * mask).sum() / mask.sum()
    elif mode == "seq-mean-token-mean":
        want = torch.stack([(loss[b] * mask[b]).sum() / mask[b].sum() for b in range(12)]).mean()
    else:
        want = torch.stack([(loss[b] * mask[b]).sum() / 16 for b in range(12)]).mean()
    norm = common.LossNorm(tokens=mask.sum().item() / 2, seqs=6, max_len=16)
    per_rank = []
    for rank_rows in (range(0, 6), range(6, 12)):
        rows = list(rank_rows)
        per_rank.append(sum(common.agg_loss(loss[rows[i:i + 2]], mask[rows[i:i + 2]], mode, norm) for i in (0, 2, 4)))
    torch.testing.assert_close(sum(per_rank) / 2, want)


def _head(vocab_model=13, hidden=6, bias=False):
    head = torch.nn.Linear(hidden, vocab_model, bias=bias)
    return head


@pytest.mark.parametrize("chunk,bias,temperature", [(1, False, 0.7), (3, True, 0.7), (100, False, 0.7), (4, True, 1.0)])
def test_chunked_logprobs_equal_full_log_softmax(chunk, bias, temperature):
    """Values and gradients (of h, the head's weight and bias, under any upstream gradient) of the chunked head with
    its own backward equal a plain [N, V] log_softmax; logits past the tokenizer's length (Qwen's padded vocab) are
    excluded and get no gradient; temperature divides the logits."""
    head = _head(bias=bias)
    h = torch.randn(11, 6, requires_grad=True)
    y = torch.randint(0, 10, (11,))
    g = torch.randn(11)
    logp, ent = common.logprobs_from_hidden(h, head, y, vocab=10, temperature=temperature, chunk=chunk)
    full = (head(h)[:, :10] / temperature).log_softmax(-1)
    torch.testing.assert_close(logp, full.gather(1, y[:, None]).squeeze(1))
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1))
    assert not ent.requires_grad
    params = [h, head.weight] + ([head.bias] if bias else [])
    g1 = torch.autograd.grad((logp * g).sum(), params)
    g2 = torch.autograd.grad((full.gather(1, y[:, None]).squeeze(1) * g).sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert g1[1][10:].abs().max() == 0
    with torch.no_grad():  # the scoring path (a frozen teacher): the same values, no graph
        logp_ng, _ = common.logprobs_from_hidden(h, head, y, vocab=10, temperature=temperature, chunk=chunk)
    torch.testing.assert_close(logp_ng, logp.detach())
    assert not logp_ng.requires_grad
    # without the entropy (a teacher's or reference's scores): the same log-probs and gradients, no entropy
    logp_ne, ent_ne = common.logprobs_from_hidden(h, head, y, vocab=10, temperature=temperature, chunk=chunk,
                                                  entropy=False)
    assert ent_ne is None
    torch.testing.assert_close(logp_ne, logp)
    for a, b in zip(torch.autograd.grad((logp_ne * g).sum(), params), g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_full_kl_equals_plain(direction, bias):
    """Values and gradients (of h and of the model's head, none for the reference) of the chunked KL with its own
    backward equal the plain KL over full logits; padded vocabulary rows get no gradient."""
    head, head_ref = _head(bias=bias), _head(vocab_model=16, bias=bias)  # padded vocabs differ, 10 tokens shared
    h = torch.randn(9, 6, requires_grad=True)
    h_ref = torch.randn(9, 6)
    g = torch.rand(9)
    kl = common.kl_from_hidden(h, head, h_ref, head_ref, vocab=10, direction=direction, chunk=4)
    ls, lt = head(h)[:, :10], head_ref(h_ref)[:, :10]
    want = common.kl_from_logits(ls, lt) if direction == "reverse" else common.kl_from_logits(lt, ls)
    torch.testing.assert_close(kl, want)
    params = [h, *head.parameters()]
    got = torch.autograd.grad((kl * g).sum(), params, retain_graph=True)
    for a, b in zip(got, torch.autograd.grad((want * g).sum(), params)):
        torch.testing.assert_close(a, b)
    (kl * g).sum().backward()
    assert got[1][10:].abs().max() == 0 and all(p.grad is None for p in head_ref.parameters())
    assert (kl >= -1e-6).all()


def _tiny_model(vocab=40, tied=True):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied,
                      pad_token_id=0, eos_token_id=1)
    return Qwen3ForCausalLM(cfg).eval()


def test_token_logprobs_match_model_logits():
    """On a right-padded batch, the hidden-state path gives the model's own logits' log-softmax at every response
    token, zeros elsewhere."""
    model = _tiny_model()
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 1], [12, 1]]
    batch = common.Batch.of(prompts, responses, pad_id=0, device="cpu")
    logp, _ = common.token_logprobs(model, batch, vocab=36, chunk=2)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([p + r])
        full = model(input_ids=seq).logits[0, :, :36].log_softmax(-1)
        for t in range(len(p), len(p) + len(r)):
            assert abs(logp[b, t].item() - full[t - 1, seq[0, t]].item()) < 1e-5
    assert (logp * (1 - batch.mask_BT)).abs().max() == 0


def test_score_logprobs_over_micro_batches_equals_one_pass():
    """Scoring one trimmed micro-batch at a time fills the same [B, T] grid as one pass over the whole batch, with
    no graph kept."""
    model = _tiny_model()
    prompts, responses = [[5, 6, 7], [8, 9], [3], [4, 4, 4, 4]], [[10, 11, 1], [12, 1], [13, 14, 15, 1], [16]]
    batch = common.Batch.of(prompts, responses, pad_id=0, device="cpu")
    want, _ = common.token_logprobs(model, batch, vocab=36, temperature=0.7, chunk=3)
    got = common.score_logprobs(model, batch, vocab=36, temperature=0.7, micro_batch_size=1, chunk=3)
    torch.testing.assert_close(got, want.detach())
    assert not got.requires_grad


def test_batch_layout_and_micro_batches():
    batch = common.Batch.of([[5, 6], [7]], [[8, 9, 1], [2]], pad_id=0, device="cpu")
    assert batch.ids_BT.tolist() == [[5, 6, 8, 9, 1], [7, 2, 0, 0, 0]]
    assert batch.mask_BT.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    (r0, mb0), (r1, mb1) = list(batch.micro_batches(1))
    assert mb0.T == 5 and mb1.T == 2 and mb1.ids_BT.tolist() == [[7, 2]]
    grid = common.response_grid([[5, 6], [7]], [[0.1, 0.2, 0.3], [0.4]], 5, "cpu")
    torch.testing.assert_close(grid, torch.tensor([[0, 0, 0.1, 0.2, 0.3], [0, 0.4, 0, 0, 0]]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert common.to_grid(x, batch).tolist() == [[0, 0, 1, 2, 3], [0, 4, 0, 0, 0]]


def test_pass_at_k_matches_subset_enumeration():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 4), (7, 3, 7), (8, 1, 8)]:
        hits = [any(s) for s in itertools.combinations([1] * c + [0] * (n - c), k)]
        assert abs(common.pass_at_k(n, c, k) - sum(hits) / len(hits)) < 1e-9


def test_summarize_eval():
    recs = [{"correct": [1, 0, 0, 1], "answers": ["3", "4", "4", "3"], "lengths": [10, 20, 30, 40]},
            {"correct": [0, 0, 0, 0], "answers": [None, "1", "1", None], "lengths": [5, 5, 5, 5]},
            {"correct": [0, 1, 1, 1], "answers": ["2", "5", "5", "5"], "lengths": [1, 1, 1, 1]}]
    s = common.summarize_eval(recs, [1, 2, 8])
    assert s["avg@4"] == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert s["pass@1"] == pytest.approx(s["avg@4"])
    assert s["pass@2"] == pytest.approx((common.pass_at_k(4, 2, 2) + 0 + common.pass_at_k(4, 3, 2)) / 3)
    assert "pass@8" not in s
    assert s["maj@4"] == pytest.approx(2 / 3)  # problem 1: "3" and "4" tie, the first seen ("3") is correct
    assert s["mean_length"] == pytest.approx((25 + 5 + 1) / 3)


def test_summarize_eval_standard_error_over_problems():
    """avg@n_se is the standard error over problems of each problem's mean accuracy (ddof = 1): a hand-made table
    whose value is known in closed form, a loop reference on random tables, and None for a single problem."""
    def rec(correct):
        return {"correct": correct, "answers": [None] * len(correct), "lengths": [1] * len(correct)}

    # per-problem accuracies 1, 0, 1/2, 1/2: mean 1/2, sample variance (1/4 + 1/4) / 3 = 1/6, SE sqrt(1/6 / 4)
    s = common.summarize_eval([rec([1, 1]), rec([0, 0]), rec([1, 0]), rec([0, 1])], [1])
    assert s["avg@2"] == 0.5 and s["avg@2_se"] == pytest.approx(1 / math.sqrt(24))
    for P, n in [(2, 1), (5, 4), (37, 8)]:
        table = torch.randint(0, 2, (P, n)).tolist()
        acc = [sum(row) / n for row in table]
        mean = sum(acc) / P
        sd = math.sqrt(sum((a - mean) ** 2 for a in acc) / (P - 1))
        s = common.summarize_eval([rec(row) for row in table], [1])
        assert s[f"avg@{n}"] == pytest.approx(mean) and s[f"avg@{n}_se"] == pytest.approx(sd / math.sqrt(P))
    assert common.summarize_eval([rec([1, 0, 1])], [1])["avg@3_se"] is None
