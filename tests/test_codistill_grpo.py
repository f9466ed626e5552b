"""codistill_grpo.py: the KD reward and the importance weights against slow loop references, end-to-end runs (python
and 2-rank torchrun), the paper's baselines by flags, learning, exact resume, and clear errors on bad input."""

import itertools
import json
import math

import pytest
import torch

import codistill_grpo as cd
import cli
import common
import runtime
from conftest import finite, read_jsonl, run_script, stop_after, without_timing

SMOKE = ("--preset", "tiny", "--total-steps", "4", "--eval-every", "2", "--save-every", "2", "--eval-limit", "16",
         "--eval-samples", "2", "--prompts-per-step", "4", "--group-size", "4")
QUICK = ("--preset", "tiny", "--total-steps", "2", "--eval-every", "0", "--save-every", "0", "--eval-limit", "8",
         "--eval-samples", "1", "--prompts-per-step", "4", "--group-size", "4")


def _args(**kw):
    return cli.parse_args(cd.Args, cd.PRESETS, ["--preset", "tiny"] + [
        x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))])


def _loop_group_norm(r: list[float]) -> list[float]:
    mean = sum(r) / len(r)
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
    return [(x - mean) / (std + 1e-6) for x in r]


def _random_rollouts(P=3, G=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp_L = -torch.rand(P * G, T, generator=g) * 4
    lp_S = -torch.rand(P * G, T, generator=g) * 4
    lp_S[0, 3] = -30.0  # a token the small model finds very unlikely: its log-ratio must be clamped
    mask = (torch.rand(P * G, T, generator=g) > 0.25).float()
    mask[:, 0] = mask[0, 3] = 1.0
    acc = (torch.rand(P, G, generator=g) > 0.5).float()
    fmt = torch.randint(0, 3, (P, G), generator=g).float() * 0.25
    return lp_L, lp_S, mask, acc, fmt


@pytest.mark.parametrize("level", ["seq_mean", "token"])
def test_kd_reward_matches_loop(level):
    """Eq. 1-2 token by token: d = clamp(logp_L − logp_S, ±c) on response tokens; seq_mean normalises
    acc + fmt + λ·mean_t d within each group, token adds λ·d_t to the normalised acc + fmt."""
    P, G, T, lam, c = 3, 4, 7, 0.3, 5.0
    lp_L, lp_S, mask, acc, fmt = _random_rollouts(P, G, T)
    args = _args(kd_coef=lam, kd_clip=c, kd_level=level)
    d = cd.kd_logratio(lp_L, lp_S, mask, c)
    adv, s = cd.small_advantages(acc, fmt, d, mask, args)
    acc_abs = kd_abs = flips = 0.0
    for p in range(P):
        scores, base = [], []
        for g in range(G):
            b = p * G + g
            ds = [min(max(lp_L[b, t].item() - lp_S[b, t].item(), -c), c) for t in range(T) if mask[b, t]]
            assert abs(s[p, g].item() - sum(ds) / len(ds)) < 1e-5
            scores.append(acc[p, g].item() + fmt[p, g].item() + lam * sum(ds) / len(ds))
            base.append(acc[p, g].item() + fmt[p, g].item())
        for g, (a_seq, a_base) in enumerate(zip(_loop_group_norm(scores), _loop_group_norm(base))):
            b = p * G + g
            for t in range(T):
                dt = min(max(lp_L[b, t].item() - lp_S[b, t].item(), -c), c)
                want = (a_seq if level == "seq_mean" else a_base + lam * dt) if mask[b, t] else 0.0
                assert abs(adv[b, t].item() - want) < 1e-4, (b, t)
                if mask[b, t]:  # the metrics' split: the accuracy part is GRPO on acc + fmt, the KD part the rest
                    acc_abs, kd_abs = acc_abs + abs(a_base), kd_abs + abs(want - a_base)
                    flips += want * a_base < 0
    assert d[0, 3].item() == pytest.approx(c)
    meter = runtime.Meter(clock=False)
    cd.small_metrics(meter, acc, fmt, s, adv, None, None, mask, args)
    m, n = meter.read(mask.sum()), mask.sum().item()
    assert m["adv/acc_abs_mean"] == pytest.approx(acc_abs / n, abs=1e-5)
    assert m["adv/kd_abs_mean"] == pytest.approx(kd_abs / n, abs=1e-5) and m["adv/kd_abs_mean"] > 0.01
    assert m["adv/kd_flip_frac"] == pytest.approx(flips / n, abs=1e-6)


def test_kd_coef_zero_is_grpo():
    lp_L, lp_S, mask, acc, fmt = _random_rollouts()
    for level in ("seq_mean", "token"):
        adv, _ = cd.small_advantages(acc, fmt, cd.kd_logratio(lp_L, lp_S, mask, 5.0), mask,
                                     _args(kd_coef=0, kd_level=level))
        torch.testing.assert_close(adv, common.group_advantages(acc + fmt).view(-1, 1) * mask)


@pytest.mark.parametrize("mode", ["token_tis", "none", "token_mask", "seq_snis"])
def test_large_is_weights_match_loop(mode):
    """Eq. 4 for each --large-is on a mixed group (rows the large model sampled itself get weight 1), and the
    share of truncated (token_mask: dropped) weights."""
    P, G, T, C = 3, 4, 7, 2.0
    lp_L, lp_S, mask, _, _ = _random_rollouts(P, G, T, seed=1)
    lp_S = lp_L + torch.randn(P * G, T, generator=torch.Generator().manual_seed(2)) * 0.8  # ratios on both sides of C
    from_small = torch.tensor([1.0, 1.0, 1.0, 0.0] * P)
    w, cut = cd.large_is_weights(lp_L, lp_S, mask, from_small, G, _args(large_is=mode, is_cap=C))
    assert not w.requires_grad
    want, n_cut, n = torch.zeros(P * G, T), 0, 0
    for p in range(P):
        rows = [p * G + g for g in range(G) if from_small[p * G + g]]
        seq_log = {b: sum(lp_L[b, t].item() - lp_S[b, t].item() for t in range(T) if mask[b, t]) for b in rows}
        z = sum(math.exp(v) for v in seq_log.values())
        for g in range(G):
            b = p * G + g
            if mode == "seq_snis" and b in rows:
                wb = math.exp(seq_log[b]) / z * len(rows)
                n, n_cut = n + 1, n_cut + (wb > C)
            for t in range(T):
                if not mask[b, t]:
                    continue
                r = math.exp(lp_L[b, t].item() - lp_S[b, t].item())
                if b not in rows:
                    want[b, t] = 1.0
                    continue
                if mode == "seq_snis":
                    want[b, t] = min(wb, C)
                    continue
                n += 1
                if mode == "token_mask":
                    want[b, t], n_cut = (1.0, n_cut) if 1 / C <= r <= C else (0.0, n_cut + 1)
                else:
                    want[b, t], n_cut = (min(r, C) if mode == "token_tis" else 1.0), n_cut + (r > C)
    torch.testing.assert_close(w, want, atol=1e-5, rtol=1e-5)
    assert cut == pytest.approx(n_cut / n) and 0 < n_cut < n


def test_merge_groups_and_raw_prompts(warm):
    x = torch.arange(2 * 4 * 3).view(8, 3)          # 2 prompts x 4 rows, 3 columns
    y = 100 + torch.arange(2 * 1 * 5).view(2, 5)     # 2 prompts x 1 row, 5 columns
    m = cd.merge_groups(x, y, 3, 1, pad=-1)
    assert m.shape == (8, 5)
    assert m[:3, :3].tolist() == x[:3].tolist() and m[3].tolist() == y[0].tolist()
    assert m[4:7, :3].tolist() == x[4:7].tolist() and m[7].tolist() == y[1].tolist() and m[0, 4] == -1
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(warm["small"])
    assert common.encode_prompt(tok, "What is 1+2?", "Q: {problem}\nA:", chat=False) == \
        tok("Q: What is 1+2?\nA:").input_ids
    chat = common.encode_prompt(tok, "What is 1+2?", "{problem}")
    assert tok.decode(chat).startswith("<|im_start|>user\nWhat is 1+2?<|im_end|>")


def _check_run(out, steps, large=True):
    names = ["config.json", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "curves.png", "final/model.safetensors"]
    for name in names + (["final_large/model.safetensors", "final_large/tokenizer.json"] if large else []):
        assert (out / name).exists(), name
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(finite(r) for r in rows)
    keys = ["reward/mean", "reward/kd", "reward/total", "kl/large", "kd/clamped_frac", "small/loss/pg",
            "small/policy/entropy", "small/policy/clip_low", "small/policy/grad_norm", "timing_s/rollout",
            "timing_s/large_logp", "timing_s/step", "response/mean_length"]
    if large:
        keys += ["large/loss/pg", "large/policy/entropy", "large/policy/clip_high", "large/policy/grad_norm",
                 "large/reward/mean", "timing_s/large_update", "timing_s/large_step"]
    for key in keys:
        assert key in rows[0], key
    return rows


def test_end_to_end_python_and_exact_resume(tmp_path, warm):
    """The smoke run's outputs; then the same run stopped after its step-2 checkpoint and resumed logs the same later
    metrics and evaluations (timings aside): both models, both optimizers, data position and rollout seeds come
    back, and the large model's rollout engine gets its restored weights."""
    run_script("codistill_grpo.py", *SMOKE, "--output-dir", str(tmp_path / "run"))
    rows = _check_run(tmp_path / "run", 4)
    for key in ("large/is/weight_mean", "large/is/weight_max/max", "large/is/truncated_frac"):
        assert key in rows[0], key
    assert all(r["large/reward/mean"] == r["reward/mean"] for r in rows)  # both train on the same rollouts
    evals = read_jsonl(tmp_path / "run" / "eval.jsonl")
    for tag in ("", "large"):
        mine = [e for e in evals if e.get("tag", "") == tag]
        assert {e["step"] for e in mine} == {0, 2, 4}
        assert {e["benchmark"] for e in mine} == {"tiny_add", "tiny_mul", "tiny_lin"}
        assert all(finite(e) and 0 <= e["avg@2"] <= 1 for e in mine)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["args"]["model"] == "tiny:small" and cfg["args"]["large_model"] == "tiny:large"
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final_large").config.hidden_size == 128

    stopped = tmp_path / "stopped"
    stop_after(tmp_path / "run", stopped, 2)
    run_script("codistill_grpo.py", *SMOKE, "--resume", str(stopped))
    resumed = read_jsonl(stopped / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]

    for a, b in zip(rows[2:], resumed[2:]):
        assert without_timing(a) == without_timing(b)
    assert read_jsonl(stopped / "eval.jsonl") == evals


def test_end_to_end_torchrun_two_ranks(tmp_path, warm):
    """Mixed groups (the large model samples 2 of 4), sequence-level weights, the token-level KD reward and two
    optimizer steps per batch (old log-probs computed beforehand) on 2 ranks."""
    run_script("codistill_grpo.py", *SMOKE, "--output-dir", str(tmp_path / "run"), "--large-rollout-frac", "0.5",
               "--large-is", "seq_snis", "--kd-level", "token", "--num-minibatches", "2", "--micro-batch-size", "4",
               nproc=2)
    rows = _check_run(tmp_path / "run", 4)
    for key in ("large/response/mean_length", "timing_s/large_rollout", "large/is/truncated_frac"):
        assert key in rows[0], key
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2


def test_baselines_by_flags(tmp_path, warm):
    """--kd-coef 0: the small model's run is the same whether the large model trains on its rollouts or on its own
    (plain GRPO; the large model never touches it). --large-rollout-frac 1: standard GRPO for the large model, no
    importance weights. --train-large false: a frozen oracle, evaluated once, not saved."""
    fast = ("--eval-large", "false")
    run_script("codistill_grpo.py", *QUICK, *fast, "--kd-coef", "0", "--output-dir", str(tmp_path / "a"))
    run_script("codistill_grpo.py", *QUICK, *fast, "--kd-coef", "0", "--large-rollout-frac", "1",
               "--output-dir", str(tmp_path / "b"))
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    for ra, rb in zip(a, b):
        for k in ra:
            if k.startswith(("small/", "reward/", "response/")) and k != "reward/kd":  # kd: scored in a only
                assert ra[k] == rb[k], k
    assert "large/is/weight_mean" in a[0] and "large/is/weight_mean" not in b[0]
    assert "kl/large" in a[0] and "kl/large" not in b[0]  # b: nothing needs the large model's scores
    assert "large/response/mean_length" in b[0] and b[0]["timing_s/large_rollout"] > 0
    run_script("codistill_grpo.py", *QUICK, "--train-large", "false", "--output-dir", str(tmp_path / "c"))
    c = read_jsonl(tmp_path / "c" / "metrics.jsonl")
    assert all(finite(r) for r in c) and "kl/large" in c[0] and not any(k.startswith("large/") for k in c[0])
    assert not (tmp_path / "c" / "final_large").exists()
    assert {e["step"] for e in read_jsonl(tmp_path / "c" / "eval.jsonl") if e.get("tag") == "large"} == {2}


def test_token_kd_with_a_frozen_large_model_is_kdrl(tmp_path, warm):
    """--kd-level token with a frozen large model and no clamp puts λ·(log π_L − log π_S) into each token's
    advantage: at ratio 1 the gradient of KDRL's β·k2 with a constant β = λ. The two scripts take the same steps
    (same rollouts, gradient norms, KL) and end at the same held-out accuracy."""
    run_script("codistill_grpo.py", *QUICK, "--kd-level", "token", "--kd-coef", "0.5", "--kd-clip", "1e4",
               "--train-large", "false", "--eval-large", "false", "--output-dir", str(tmp_path / "cd"))
    run_script("kdrl.py", *QUICK, "--kd-schedule", "constant", "--kd-coef", "0.5", "--output-dir", str(tmp_path / "kd"))
    cd_rows, kd_rows = read_jsonl(tmp_path / "cd" / "metrics.jsonl"), read_jsonl(tmp_path / "kd" / "metrics.jsonl")
    assert len(cd_rows) == len(kd_rows) == 2
    for c, k in zip(cd_rows, kd_rows):
        assert c["reward/mean"] == k["reward/mean"] and c["response/mean_length"] == k["response/mean_length"]
        assert c["small/policy/grad_norm"] == pytest.approx(k["policy/grad_norm"], rel=1e-5)
        assert c["kl/large"] == pytest.approx(k["kl/teacher"], rel=1e-5)
    evals = [{r["benchmark"]: r["avg@1"] for r in read_jsonl(tmp_path / run / "eval.jsonl")} for run in ("cd", "kd")]
    assert evals[0] == evals[1]


def test_bad_input_errors_are_clear(tmp_path, warm):
    for kw, msg in ((dict(large_rollout_frac=0.3), "whole number of rollouts"),
                    (dict(large_rollout_frac=1.5), "whole number of rollouts"),
                    (dict(large_rollout_frac=1, train_large="false"), "--train-large is false"),
                    (dict(kd_coef=0, train_large="false"), "nothing to do"),
                    (dict(is_cap=0.5), "--is-cap must be >= 1")):
        with pytest.raises(ValueError, match=msg):
            cd.check_args(_args(**kw))
    assert cd.check_args(_args(large_rollout_frac=0.25)) == 2
    # a large model with another tokenizer
    import tiny
    from transformers import AutoTokenizer
    with pytest.raises(ValueError, match="--model and --large-model use different tokenizers"):
        runtime.check_same_tokenizer(AutoTokenizer.from_pretrained(warm["small"]), tiny.build_tokenizer(300),
                                     "--model", "--large-model")
    # --rollout vllm on a machine without vLLM
    p = run_script("codistill_grpo.py", *QUICK, "--output-dir", str(tmp_path / "v"), "--rollout", "vllm", check=False,
                   hide=("vllm",))
    assert p.returncode != 0 and "--rollout vllm needs vLLM" in p.stderr


def test_tiny_preset_learns(tmp_path, warm):
    """The tiny run of docs/codistill_grpo.md: 40 CoDistill-GRPO steps on the CPU toy world. MEASURED_MARGINS"""
    out = tmp_path / "run"
    run_script("codistill_grpo.py", "--preset", "tiny", "--output-dir", str(out), "--eval-every", "40",
               "--save-every", "0", timeout=1800)
    evals = read_jsonl(out / "eval.jsonl")
    acc = {(s, tag): sum(e["avg@4"] for e in evals if e["step"] == s and e.get("tag", "") == tag) / 3
           for s, tag in itertools.product((0, 40), ("", "large"))}
    assert acc[40, ""] >= acc[0, ""] + 0.04, acc
    assert acc[40, "large"] >= acc[0, "large"] - 0.05, acc
    rows = read_jsonl(out / "metrics.jsonl")
    assert all(finite(r) for r in rows) and len(rows) == 40
    kl_first = sum(r["kl/large"] for r in rows[:10]) / 10
    kl_last = sum(r["kl/large"] for r in rows[-10:]) / 10
    assert kl_last < 0.6 * kl_first, (kl_first, kl_last)
