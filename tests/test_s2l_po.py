"""s2l_po.py: the explorer schedule against a table, the loss against its definition, the explorer bank's reuse and
invalidation, end-to-end runs (python and 2-rank torchrun), the pass@k probe, learning, exact resume, and clear
errors on bad input."""

import json
import random
import shutil

import pytest
import torch

import cli
import common
import engines
import s2l_po
from conftest import finite, read_jsonl, run_script, stop_after, without_timing

SMOKE = ("--preset", "tiny", "--total-steps", "4", "--t-mix", "3", "--eval-every", "2", "--save-every", "2",
         "--eval-limit", "16", "--eval-samples", "2", "--prompts-per-step", "4", "--group-size", "4",
         "--bank-samples", "4")


def _args(**kw):
    return cli.parse_args(s2l_po.Args, s2l_po.PRESETS, ["--preset", "tiny"] + [
        x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))])


def _plan(steps, **kw):
    a = _args(**kw)
    return [s2l_po.substeps(t, a) for t in range(steps)]


def test_schedule_matches_the_paper_and_code_tables():
    """G = 16, T_mix = 8 (the paper's run): paper G_w/G_s and the released code's ceil-on-both-sides counts, as
    tabulated from Algorithm 1 and off2on_4b_8b_16_8.sh; then on-policy GRPO."""
    paper = [(16, 0), (14, 2), (12, 4), (10, 6), (7, 9), (5, 11), (3, 13), (0, 16), (0, 16), (0, 16)]
    code = [(16, 0), (14, 3), (12, 5), (10, 7), (7, 10), (5, 12), (3, 14), (0, 16), (0, 16), (0, 16)]
    assert _plan(10, group_size=16, t_mix=8) == [[p] for p in paper]
    alt = _plan(10, group_size=16, t_mix=8, group_mode="alternating")
    assert alt == [[(w, 0)] * (w > 0) + [(0, s)] * (s > 0) for w, s in code]
    a = _args(group_size=16, t_mix=8)
    assert [round(s2l_po.explorer_share(t, a), 4) for t in range(9)] == [1.0, 0.8571, 0.7143, 0.5714, 0.4286,
                                                                        0.2857, 0.1429, 0.0, 0.0]


def test_schedule_edge_cases():
    # T_mix = 1: one explorer-only step, then GRPO; T_mix = 0: GRPO throughout
    assert _plan(3, group_size=8, t_mix=1) == [[(8, 0)], [(0, 8)], [(0, 8)]]
    assert _plan(3, group_size=8, t_mix=0) == [[(0, 8)]] * 3
    # G not divisible by the steps: G = 10, T_mix = 4 -> α = 1, 2/3, 1/3, 0
    assert _plan(5, group_size=10, t_mix=4) == [[(10, 0)], [(7, 3)], [(4, 6)], [(0, 10)], [(0, 10)]]
    assert _plan(4, group_size=10, t_mix=4, group_mode="alternating") == [[(10, 0)], [(7, 0), (0, 4)],
                                                                          [(4, 0), (0, 7)], [(0, 10)]]
    # α·G exactly integral must not round up through floating-point error (9·(1 − 1/3) = 6.000000000000001)
    assert [p[0][0] for p in _plan(5, group_size=9, t_mix=4)] == [9, 6, 3, 0, 0]
    assert [p[0][0] for p in _plan(8, group_size=7, t_mix=8)] == [7, 6, 5, 4, 3, 2, 1, 0]
    # the alternatives: cosine, step (hold α_1 until T_mix), constant (hold it always)
    assert _plan(4, group_size=8, t_mix=3, schedule="cosine") == [[(8, 0)], [(4, 4)], [(0, 8)], [(0, 8)]]
    assert _plan(4, group_size=8, t_mix=2, schedule="step", alpha_start=0.5) == [[(4, 4)], [(4, 4)], [(0, 8)],
                                                                                 [(0, 8)]]
    assert _plan(3, group_size=8, t_mix=1, schedule="constant", alpha_start=0.25) == [[(2, 6)]] * 3
    assert _plan(2, group_size=8, t_mix=2, alpha_start=0.5) == [[(4, 4)], [(0, 8)]]


def _loss_ref(logp, old, ref, adv, isw, mask, clip, dual, beta):
    total, n = 0.0, 0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t] == 0:
                continue
            r = (logp[b, t] - old[b, t]).exp().item()
            a = adv[b].item()
            pg = max(-r * a, -min(max(r, 1 - clip), 1 + clip) * a)
            if dual and a < 0:
                pg = min(pg, -dual * a)
            lr = ref[b, t].item() - logp[b, t].item()
            total += isw[b, t].item() * pg + beta * (pow(2.718281828459045, lr) - lr - 1)
            n += 1
    return total / n


@pytest.mark.parametrize("dual", [0.0, 3.0])
def test_loss_matches_loop_reference(dual):
    """PPO-clip with dual clip, importance weights on the policy term only, k3 KL to the reference, token-mean."""
    torch.manual_seed(0)
    logp = torch.randn(5, 6).clamp(max=-0.05)
    old = logp + torch.randn(5, 6) * 1.5  # ratios far outside the clip range, both ways
    ref = logp + torch.randn(5, 6) * 0.3
    adv, mask = torch.randn(5), (torch.rand(5, 6) > 0.2).float()
    isw = torch.rand(5, 6) * 2
    a = _args(dual_clip=dual, kl_coef=0.1)
    norm = common.LossNorm(mask.sum().item(), 5, 6)
    loss, *_ = s2l_po.s2l_loss(logp, old, ref, adv, isw, mask, norm, a)
    assert abs(loss.item() - _loss_ref(logp, old, ref, adv, isw, mask, 0.2, dual, 0.1)) < 1e-5


def test_dapo_wrapper_is_removed_and_nothing_else():
    wrapped = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is $1+1$?\n\n"
               'Remember to put your answer on its own line after "Answer:".')
    assert common.strip_dapo_wrapper(wrapped) == "What is $1+1$?"
    assert common.strip_dapo_wrapper("What is 3+4?\n\nShow work.") == "What is 3+4?\n\nShow work."


def test_bank_draws_without_replacement_and_reproducibly(tmp_path):
    bank, prompt = engines.CompletionBank(tmp_path, {"x": 1}), [5, 6, 7]
    bank.shards = [{"keys": [engines.prompt_key(prompt)], "n": 4, "offsets": torch.tensor([0, 1, 3, 6, 10]),
                    "tokens": torch.arange(10, dtype=torch.int32), "logprobs": -torch.arange(10.0),
                    "finished": torch.tensor([True, False, True, True])}]
    bank.index = {engines.prompt_key(prompt): (0, 0)}
    draw = bank.draw(prompt, 4, random.Random(1))
    assert sorted(c.token_ids for c in draw) == [[0], [1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [c.token_ids for c in bank.draw(prompt, 3, random.Random(5))] == \
           [c.token_ids for c in bank.draw(prompt, 3, random.Random(5))]
    assert len(bank.draw(prompt, 6, random.Random(0))) == 6  # more than stored: with replacement
    with pytest.raises(KeyError, match="not in the bank"):
        bank.draw([8], 1, random.Random(0))


def test_bank_is_reused_extended_and_invalidated(tmp_path, warm):
    """A bank is built once and reused while its settings match; a run that needs more prompts adds only those;
    other sampling settings or other explorer weights make a new bank."""
    base = (*SMOKE, "--bank-only", "--bank-dir", str(tmp_path / "banks"), "--output-dir", str(tmp_path / "o"))
    first = run_script("s2l_po.py", *base, "--t-mix", "2")
    assert "generating 4 prompts x 4 (0 already there)" in first.stdout
    (bank,) = (tmp_path / "banks").iterdir()
    man = json.loads((bank / "manifest.json").read_text())
    assert man["settings"]["n"] == 4 and man["settings"]["sampling"]["temperature"] == 0.7
    assert man["settings"]["seed"] == 0 and len(man["settings"]["weights"]) == 24
    shard = torch.load(bank / man["shards"][0], weights_only=True)
    assert len(shard["keys"]) == 4 and len(shard["offsets"]) == 4 * 4 + 1
    again = run_script("s2l_po.py", *base, "--t-mix", "2")
    assert "generating" not in again.stdout and "4 prompts" in again.stdout
    more = run_script("s2l_po.py", *base, "--t-mix", "3")  # step 2 now draws 4 more prompts
    assert "generating 4 prompts x 4 (4 already there)" in more.stdout
    assert len(json.loads((bank / "manifest.json").read_text())["shards"]) == 2
    run_script("s2l_po.py", *base, "--t-mix", "2", "--bank-temperature", "1.0")
    assert len(list((tmp_path / "banks").iterdir())) == 2
    # other explorer weights in the same folder: a new fingerprint, hence a new bank
    from safetensors.torch import load_file, save_file
    explorer = tmp_path / "explorer"
    shutil.copytree(warm["small"], explorer)
    assert engines.weights_fingerprint(str(explorer)) == engines.weights_fingerprint(str(warm["small"]))
    sd = load_file(explorer / "model.safetensors")
    name = next(iter(sd))
    sd[name] = sd[name] + 1e-3
    save_file(sd, explorer / "model.safetensors", metadata={"format": "pt"})
    assert engines.weights_fingerprint(str(explorer)) != engines.weights_fingerprint(str(warm["small"]))


def _check_run(out, steps, shares):
    for name in ("config.json", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "curves.png", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json"):
        assert (out / name).exists(), name
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(finite(r) for r in rows)
    assert [round(r["explorer/share"], 3) for r in rows] == shares
    for key in ("reward/mean", "kl/ref", "loss/total", "loss/pg", "loss/kl", "policy/entropy", "explorer/alpha",
                "timing_s/rollout", "timing_s/ref", "perf/tokens_per_s", "response/mean_length"):
        assert key in rows[0], key
    for r, share in zip(rows, shares):  # per-source metrics exactly where that source wrote sequences
        for s, present in (("explorer", share > 0), ("learner", share < 1)):
            for k in (f"reward/{s}", f"adv/{s}_mean", f"adv/{s}_std", f"response/{s}_length"):
                assert (k in r) == present, (r["step"], k)
        assert ("explorer/logp_gap" in r) == (share > 0)
    evals = read_jsonl(out / "eval.jsonl")
    assert {e["step"] for e in evals} == set(range(0, steps + 1, 2))
    assert {e["benchmark"] for e in evals} == {"tiny_add", "tiny_mul", "tiny_lin"}
    samples = read_jsonl(out / "samples.jsonl")
    assert {s["source"] for s in samples if s["step"] == 1} == {"explorer"}
    assert {s["source"] for s in samples if s["step"] == steps} == {"learner"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["args"]["model"] == "tiny:base" and cfg["args"]["explorer"] == "tiny:small"
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_end_to_end_python(tmp_path, warm):
    run_script("s2l_po.py", *SMOKE, "--output-dir", str(tmp_path / "run"), "--bank-dir", str(tmp_path / "banks"))
    _check_run(tmp_path / "run", 4, [1.0, 0.5, 0.0, 0.0])


def test_end_to_end_torchrun_two_ranks_alternating_with_tis(tmp_path, warm):
    """The released code's alternating steps (step 2 is an explorer-only and a learner-only update of 2 each) and
    token-level TIS on explorer tokens, on 2 ranks."""
    run_script("s2l_po.py", *SMOKE, "--output-dir", str(tmp_path / "run"), "--bank-dir", str(tmp_path / "banks"),
               "--group-mode", "alternating", "--is-correction", "token_tis", nproc=2)
    _check_run(tmp_path / "run", 4, [1.0, 0.5, 0.0, 0.0])
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(0 < r["is/weight_mean"] <= 2.0 for r in rows[:2])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2


def test_passk_probe(tmp_path, warm):
    out = tmp_path / "probe"
    run_script("bench/s2l_passk.py", "--preset", "tiny", "--passk-samples", "8", "--eval-limit", "8",
               "--passk-data", "tiny_add,tiny_lin", "--output-dir", str(out))
    res = json.loads((out / "passk.json").read_text())
    assert set(res["models"]) == {"explorer", "learner"} and res["n"] == 8
    for m in res["models"].values():
        for b in ("tiny_add", "tiny_lin"):
            curve, counts = m["benchmarks"][b]["pass@k"], m["benchmarks"][b]["correct"]
            assert len(curve) == 8 and len(counts) == 8
            assert all(x <= y + 1e-12 for x, y in zip(curve, curve[1:]))
            assert abs(curve[0] - sum(counts) / 64) < 1e-9
            assert abs(curve[-1] - sum(c > 0 for c in counts) / 8) < 1e-9
    assert (out / "passk.png").stat().st_size > 1000


def test_resume_continues_exactly(tmp_path, warm):
    """A run stopped after its step-3 checkpoint and resumed (the bank reloaded) logs the same later metrics as the
    run that was never stopped (timings aside)."""
    args = ("--preset", "tiny", "--total-steps", "6", "--t-mix", "5", "--save-every", "3", "--eval-every", "0",
            "--eval-limit", "8", "--eval-samples", "1", "--prompts-per-step", "4", "--group-size", "4",
            "--bank-samples", "4", "--bank-dir", str(tmp_path / "banks"))
    run_script("s2l_po.py", *args, "--output-dir", str(tmp_path / "full"))
    stopped = tmp_path / "stopped"
    stop_after(tmp_path / "full", stopped, 3)
    full_rows = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    run_script("s2l_po.py", *args, "--resume", str(stopped))
    resumed = read_jsonl(stopped / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))

    assert full_rows[3]["explorer/share"] > 0  # the resumed part still mixes explorer rollouts in
    for a, b in zip(full_rows[3:], resumed[3:]):
        assert without_timing(a) == without_timing(b)


def test_bad_input_errors_are_clear(tmp_path, warm):
    with pytest.raises(ValueError, match="--t-mix -1"):
        s2l_po.check_args(_args(t_mix=-1))
    with pytest.raises(ValueError, match="--alpha-start 1.5"):
        s2l_po.check_args(_args(alpha_start=1.5))
    # --rollout vllm cannot build the bank in the training process: the error names the command that does
    p = run_script("s2l_po.py", *SMOKE, "--output-dir", str(tmp_path / "v"), "--bank-dir", str(tmp_path / "b"),
                   "--rollout", "vllm", check=False)
    assert p.returncode != 0 and "--bank-only" in p.stderr
    # an explorer with another tokenizer
    import tiny
    odd = tmp_path / "odd"
    tiny.build_tokenizer(vocab_size=300).save_pretrained(odd)
    tiny.build_model("small", tiny.build_tokenizer(vocab_size=300)).save_pretrained(odd)
    p = run_script("s2l_po.py", *SMOKE, "--output-dir", str(tmp_path / "t"), "--explorer", str(odd), check=False)
    assert p.returncode != 0 and "different tokenizers" in p.stderr


def test_tiny_preset_learns(tmp_path, warm):
    """The tiny run of docs/s2l_po.md: 40 S2L-PO steps of tiny:base with explorer tiny:small (T_mix 20).

    In the study (bench/study.py, seeds 0-2, the same command) the mean held-out accuracy over the three families
    rose from 0.142 to 0.530, by 0.388 ± 0.010 (smallest 0.382); the margin of 0.25 sits over ten standard
    deviations below that, and still far above what evaluation noise alone could produce (±0.03 at 4 × 128
    samples per family)."""
    out = tmp_path / "run"
    run_script("s2l_po.py", "--preset", "tiny", "--output-dir", str(out), "--eval-every", "20", "--save-every", "0")
    evals = read_jsonl(out / "eval.jsonl")
    acc = {s: sum(e["avg@4"] for e in evals if e["step"] == s) / 3 for s in (0, 40)}
    assert acc[40] >= acc[0] + 0.25, acc
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[0]["explorer/share"] == 1.0 and rows[-1]["explorer/share"] == 0.0


def test_explorer_rescues_a_learner_that_rarely_samples_a_correct_trace(tmp_path, warm):
    """S2L-PO's precondition made to hold: tiny:hasty answers at once 98% of the time, so on `add` its own samples
    are almost never right (held-out 0.002-0.008; GRPO's rollouts earned 0.006 on average over its first 10 steps),
    while the explorer tiny:small works most of them out. In the study (bench/study.py --name s2l_hasty, seeds 0-2,
    40 steps) S2L-PO reached 0.545-0.549 in every seed; GRPO stayed at 0.01 and below in two seeds and began to
    break out in the third (0.29 at step 40). At step 20, where this test stops, S2L-PO was at 0.29-0.31 and GRPO
    at 0.002, 0.004 and 0.078: the smallest gap was 0.23, and this test's seed 0 had 0.30. The 0.15 margin is below
    the smallest gap by more than twice the evaluation's spread at 4 × 128 samples (about ±0.03)."""
    flags = ("--preset", "tiny", "--model", "tiny:hasty", "--train-data", "tiny:add", "--eval-data", "tiny_add",
             "--total-steps", "20", "--t-mix", "20", "--eval-every", "20", "--save-every", "0")
    run_script("s2l_po.py", *flags, "--output-dir", str(tmp_path / "s2l"))
    run_script("s2l_po.py", *flags, "--t-mix", "0", "--output-dir", str(tmp_path / "grpo"))

    def final(run):
        return next(e["avg@4"] for e in read_jsonl(run / "eval.jsonl") if e["step"] == 20)

    s2l, grpo = final(tmp_path / "s2l"), final(tmp_path / "grpo")
    assert s2l >= grpo + 0.15, (s2l, grpo)
    learner = [r["reward/learner"] for r in read_jsonl(tmp_path / "grpo" / "metrics.jsonl")]
    assert sum(learner) / len(learner) < 0.05, learner  # the precondition: alone it rarely writes a correct trace
