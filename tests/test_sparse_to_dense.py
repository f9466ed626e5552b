"""sparse_to_dense.py: the stage losses against slow references, the split into halves, every route of the
docstring run as written (and all stages under 2-rank torchrun), learning through the dense bridge, exact resume
across stage boundaries, and clear errors on bad input."""

import itertools
import json
import math
import re

import pytest
import torch

import cli
import common
import sparse_to_dense as s2d
from conftest import finite, read_jsonl, run_script, stop_after, without_timing

SHORT = ("--preset", "tiny", "--eval-limit", "8", "--eval-samples", "2", "--prompts-per-step", "4", "--group-size",
         "4", "--distill-prompts-per-step", "4")


def _args(**kw):
    return cli.parse_args(s2d.Args, s2d.PRESETS, ["--preset", "tiny"] + [
        x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))])


def _heads_and_hidden(n=7, hidden=6):
    """A student and a teacher head with different padded vocabularies (12 and 16) over a shared 10-token one."""
    torch.manual_seed(0)
    head, head_t = torch.nn.Linear(hidden, 12, bias=False), torch.nn.Linear(hidden, 16, bias=True)
    h = torch.randn(n, hidden, requires_grad=True)
    h_t = torch.randn(n, hidden)
    y = torch.randint(0, 10, (n,))
    return head, head_t, h, h_t, y


def _slow_kl(h, head, h_t, head_t, direction):
    """Per position, a Python loop over the vocabulary of Σ_v p(v) log(p(v)/q(v))."""
    out = []
    for n in range(h.shape[0]):
        s = head(h[n])[:10].log_softmax(0)
        t = head_t(h_t[n])[:10].log_softmax(0).detach()
        p, q = (t, s) if direction == "forward" else (s, t)
        out.append(sum(p[v].exp() * (p[v] - q[v]) for v in range(10)))
    return torch.stack(out)


@pytest.mark.parametrize("stage,direction", [("2a", "forward"), ("2b", "reverse")])
def test_full_vocab_stage_losses_match_slow_kl(stage, direction):
    """Stage 2a's loss is KL(π_T‖π_θ) and stage 2b's KL(π_θ‖π_T) at every position, over the shared vocabulary
    only (padded logits excluded), in chunks; values and gradients equal a loop over tokens."""
    head, head_t, h, h_t, y = _heads_and_hidden()
    args = _args(logprob_chunk=3)
    fn = s2d.fkl_token_loss if stage == "2a" else s2d.opd_token_loss
    got = fn(h, head, h_t, head_t, y, 10, args)
    want = _slow_kl(h, head, h_t, head_t, direction)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.sum(), [h, head.weight])
    g_want = torch.autograd.grad(want.sum(), [h, head.weight])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    assert head_t.weight.grad is None


def test_fkl_sft_is_cross_entropy_on_teacher_samples():
    head, head_t, h, h_t, y = _heads_and_hidden()
    got = s2d.fkl_token_loss(h, head, None, head_t, y, 10, _args(fkl_loss="sft"))
    want = torch.stack([-head(h[n])[:10].log_softmax(0)[y[n]] for n in range(h.shape[0])])
    torch.testing.assert_close(got, want)


def test_sampled_opd_is_k1_and_its_expected_gradient_is_the_full_reverse_kl():
    """`--opd-loss sampled` puts A_t = log π_T(y_t) − log π_θ(y_t) into an on-policy REINFORCE loss: each token's
    value is the k1 estimate, and weighting every possible sampled token by π_θ (an exact expectation over y_t)
    gives the gradient of the exact reverse KL."""
    head, head_t, h, h_t, _ = _heads_and_hidden(n=4)
    N, V = h.shape[0], 10
    h_rep, h_t_rep = h.repeat_interleave(V, 0), h_t.repeat_interleave(V, 0)
    y_rep = torch.arange(V).repeat(N)
    args = _args(opd_loss="sampled", logprob_chunk=5)
    per_tok = s2d.opd_token_loss(h_rep, head, h_t_rep, head_t, y_rep, V, args)
    lp_s = head(h_rep)[:, :V].log_softmax(-1).gather(1, y_rep[:, None]).squeeze(1)
    lp_t = head_t(h_t_rep)[:, :V].log_softmax(-1).gather(1, y_rep[:, None]).squeeze(1)
    torch.testing.assert_close(per_tok, (lp_s - lp_t).detach())
    weights = lp_s.exp().detach()
    g_sampled = torch.autograd.grad((weights * per_tok).sum(), [h, head.weight])
    exact = _slow_kl(h, head, h_t, head_t, "reverse")
    g_exact = torch.autograd.grad(exact.sum(), [h, head.weight])
    for a, b in zip(g_sampled, g_exact):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_grpo_loss_matches_loop_with_dual_clip_and_k3():
    """The surrogate with clip-higher and the dual clip, plus β·k3(π_θ‖π_ref) with k3 = r − log r − 1 at
    r = π_ref/π_θ (Table 9's KL term), token-mean, against a loop over tokens; no reference: no KL term."""
    torch.manual_seed(3)
    logp, old, ref = torch.randn(4, 5) * 0.8, torch.randn(4, 5) * 0.8, torch.randn(4, 5) * 0.8
    adv = torch.tensor([1.5, -2.0, 0.5, -0.3])
    mask = (torch.rand(4, 5) > 0.2).float()
    norm = common.LossNorm(tokens=mask.sum().item(), seqs=4, max_len=5)
    for c, beta, with_ref in ((0.0, 0.0, False), (1.5, 0.0, False), (3.0, 0.3, True)):
        args = _args(dual_clip=c, clip_low=0.2, clip_high=0.28, kl_coef=beta)
        loss, loss_pg, kl, *_ = s2d.grpo_loss(logp, old, ref if with_ref else None, adv, mask, norm, args)
        want_pg = want_kl = 0.0
        for b, t in itertools.product(range(4), range(5)):
            rho, a = math.exp(logp[b, t] - old[b, t]), adv[b].item()
            loss_t = -min(rho * a, min(max(rho, 0.8), 1.28) * a)
            if c and a < 0:
                loss_t = min(loss_t, -c * a)
            r = math.exp(ref[b, t] - logp[b, t])
            want_pg += loss_t * mask[b, t].item()
            want_kl += (r - math.log(r) - 1) * mask[b, t].item()
        n = mask.sum().item()
        assert abs(loss_pg.item() - want_pg / n) < 1e-5
        assert abs(loss.item() - (want_pg + beta * want_kl * with_ref) / n) < 1e-5
        assert (kl is None) == (not with_ref)


def test_split_into_halves():
    """App. E: two equal halves of the labelled set, disjoint, covering it, seeded, each in the original order."""
    rows = [{"problem": str(i), "answer": str(i)} for i in range(103)]
    first, second = s2d.split_halves(rows, 42)
    assert (len(first), len(second)) == (52, 51)
    assert {r["problem"] for r in first} | {r["problem"] for r in second} == {r["problem"] for r in rows}
    assert not {r["problem"] for r in first} & {r["problem"] for r in second}
    assert [int(r["problem"]) for r in second] == sorted(int(r["problem"]) for r in second)  # order kept
    assert s2d.split_halves(rows, 42) == (first, second)
    assert s2d.split_halves(rows, 7)[1] != second
    assert min(int(r["problem"]) for r in second) < 20 and max(int(r["problem"]) for r in first) > 80  # shuffled


def test_stage_lengths_in_steps_or_epochs():
    """--steps-<s> N fixes a stage's length; 0 means --grpo-epochs / --distill-epochs passes over its data at its
    prompts per step (the paper preset: 10 passes of 8 prompts for GRPO, 1 pass of 64 for distillation)."""
    args = s2d.Args()  # the paper preset is the defaults
    data = {s: ("x", [{}] * 8700) for s in s2d.STAGES}
    assert s2d.stage_lengths(args, list(s2d.STAGES), data) == {"1": 10875, "2a": 136, "2b": 136, "3": 10875}
    args.steps_2b, args.grpo_epochs = 5, 2.0
    assert s2d.stage_lengths(args, ["1", "2b"], data) == {"1": 2175, "2b": 5}


def test_stage_parsing_and_dapo_prompts():
    assert s2d.parse_stages("1,2a,2b,3") == ["1", "2a", "2b", "3"]
    assert s2d.parse_stages(" 2b , 3 ") == ["2b", "3"]
    for bad in ("2b,2a", "1,1", "2c", ""):
        with pytest.raises(ValueError, match="--stages"):
            s2d.parse_stages(bad)
    dapo = ("Solve the following math problem step by step. The last line of your response should be of the form "
            "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nFind $x$ if $2x=4$.\n\n"
            "Remember to put your answer on its own line after \"Answer:\".")
    assert common.strip_dapo_wrapper(dapo) == "Find $x$ if $2x=4$."
    assert common.strip_dapo_wrapper("What is 2+2?") == "What is 2+2?"


def _check_run(out, stages, steps_each):
    total = steps_each * len(stages)
    for name in ("config.json", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "curves.png", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json"):
        assert (out / name).exists(), name
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert [r["stage"] for r in rows] == [s for s in stages for _ in range(steps_each)]
    assert all(finite(r) for r in rows)
    keys = {"1": "loss/pg", "2a": "kl/forward", "2b": "kl/reverse", "3": "loss/pg"}
    for r in rows:
        assert keys[r["stage"]] in r and "reward/mean" in r and "timing_s/rollout" in r
    evals = read_jsonl(out / "eval.jsonl")
    ends = [steps_each * (i + 1) for i in range(len(stages))]
    assert {e["step"] for e in evals} == {0, *ends}
    assert all(finite(e) and 0 <= e["avg@2"] <= 1 for e in evals)
    for i, s in enumerate(stages):
        summary = json.loads((out / f"stage_{s}.json").read_text())
        assert summary["steps"] == [steps_each * i, steps_each * (i + 1)]
        assert (out / f"stage_{s}" / "model.safetensors").exists()
        tag = "teacher" if s == "1" else ""
        assert {e["benchmark"] for e in evals if e["step"] == ends[i] and e.get("tag", "") == tag} == set(
            summary["eval"])
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "final")
    return rows


UP = {"1": "1H", "2a": "1H", "2b": "1H"}
FULL = {"1": "full", "2a": "full", "2b": "full"}
ROUTES = {  # what each row of Table 1 (and Table 3's transfer-only rows) runs: stages, each stage's data, 2a's loss
    "R1": (["3"], {"3": "full"}, None),
    "R3-full": (["1", "2a", "2b"], FULL, "full"),
    "R5-half": (["1", "2a", "2b", "3"], {**UP, "3": "2H"}, "full"),
    "R7": (["1", "2a", "2b", "3"], {**UP, "3": "1H"}, "full"),
    "R2": (["1", "2a", "3"], {**UP, "3": "2H"}, "sft"),
    "R8": (["1", "2b", "3"], {**UP, "3": "2H"}, None),
    "R6": (["2a", "2b", "3"], {**UP, "3": "2H"}, "full"),
    "T3-raw": (["2a", "2b"], FULL, "full"),
    "T3-opd": (["1", "2b"], FULL, None),
    "T3-sft": (["1", "2a"], FULL, "sft"),
}


def _docstring_routes() -> dict[str, list[str]]:
    """The route table of the script's docstring: name -> its flags, as written there."""
    doc = s2d.__doc__
    routes = {}
    for line in doc[doc.index("Routes (Table 1"):doc.index("R5-half's flags are the defaults")].splitlines()[1:]:
        m = re.match(r"^  (\S+)\s{2,}.+?\s{2,}(--.+)$", line)
        assert m, line
        routes[m.group(1)] = m.group(2).split()
    return routes


def test_docstring_routes_are_the_papers():
    """Every route of the docstring is one of Table 1's (or Table 3's transfer-only rows), and all of them are
    there; the method's page (docs/sparse_to_dense.md) shows the same commands."""
    routes = _docstring_routes()
    assert set(routes) == set(ROUTES)
    page = (s2d.Path(s2d.__file__).parent / "docs" / "sparse_to_dense.md").read_text()
    for name, flags in routes.items():
        assert " ".join(flags) in page, name


@pytest.mark.parametrize("route", list(ROUTES))
def test_route_runs_its_stages_on_its_data(route, tmp_path, warm):
    """The docstring's command for the route on the tiny preset, one step per stage: the stages run in order, each
    on the half (1H, 2H) or the whole of the 512 labelled problems its Table 1 row names, stage 2a with its loss,
    the student stages distilling the teacher the route gives them, each GRPO stage with its initial policy as
    the KL reference. R7 (all four stages) runs two steps each and is checked in full: outputs, metrics,
    evaluations (the starting models' too) and the chain of models."""
    stages, data, loss_2a = ROUTES[route]
    flags = [str(warm["large"]) if f == "SFT_TEACHER" else f for f in _docstring_routes()[route]]
    n = 2 if route == "R7" else 1
    out = tmp_path / "run"
    run_script("sparse_to_dense.py", *SHORT, *flags, "--distill-group-size", "2", "--steps-1", str(n), "--steps-2a",
               str(n), "--steps-2b", str(n), "--steps-3", str(n), "--save-every", "0", "--output-dir", str(out),
               *(("--eval-every", "5") if route == "R7" else ("--eval-limit", "2", "--eval-samples", "1",
                                                              "--eval-every", "0")))
    assert [r["stage"] for r in read_jsonl(out / "metrics.jsonl")] == [s for s in stages for _ in range(n)]
    teacher = str(out / "stage_1") if "1" in stages else str(warm["large"]) if route == "R6" else "tiny:large"
    for s in s2d.STAGES:
        if s not in stages:
            assert not (out / f"stage_{s}.json").exists()
            continue
        summary = json.loads((out / f"stage_{s}.json").read_text())
        assert (summary["data"], summary["problems"]) == (data[s], 512 if data[s] == "full" else 256), s
        if s == "2a":
            assert summary["loss"] == loss_2a
        if s in ("2a", "2b"):
            assert summary["teacher"] == teacher
        else:
            assert summary["reference"] == summary["init"]
    if route == "R7":
        rows = _check_run(out, stages, n)
        assert json.loads((out / "stage_3.json").read_text())["init"] == str(out / "stage_2b")
        # the teacher's evaluations are tagged; stage 1 moved the teacher, whose output the student stages read
        assert {e["step"] for e in read_jsonl(out / "eval.jsonl") if e.get("tag") == "teacher"} == {0, 2}
        assert all(r["kl/ref"] >= 0 for r in rows if r["stage"] in ("1", "3"))  # the KL term to the reference


def test_all_stages_torchrun_two_ranks(tmp_path, warm):
    out = tmp_path / "run"
    run_script("sparse_to_dense.py", *SHORT, "--steps-1", "2", "--steps-2a", "2", "--steps-2b", "2", "--steps-3", "2",
               "--eval-every", "5", "--fkl-loss", "sft", "--opd-loss", "sampled", "--output-dir", str(out), nproc=2)
    rows = _check_run(out, ["1", "2a", "2b", "3"], 2)
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert json.loads((out / "stage_3.json").read_text())["problems"] == 256  # held out: 2H of 512
    assert all(r["kl/reverse"] > -1 for r in rows if r["stage"] == "2b")


def test_resume_continues_exactly_across_stages(tmp_path, warm):
    """Runs stopped (a) at a checkpoint inside stage 2a and (b) right after stage 2a finished, with no checkpoint
    in 2b, and resumed, log the same later metrics and final evaluation as the run that was never stopped."""
    args = (*SHORT, "--stages", "2a,2b", "--steps-2a", "3", "--steps-2b", "3", "--save-every", "2",
            "--eval-every", "0")
    run_script("sparse_to_dense.py", *args, "--output-dir", str(tmp_path / "full"))
    full = tmp_path / "full"
    full_rows, full_evals = read_jsonl(full / "metrics.jsonl"), read_jsonl(full / "eval.jsonl")

    for name, keep_step, copy in (("in_2a", 2, ()), ("after_2a", 3, ("stage_2a", "stage_2a.json"))):
        stopped = tmp_path / name
        stop_after(full, stopped, keep_step, copy)
        run_script("sparse_to_dense.py", *args, "--resume", str(stopped))
        resumed = read_jsonl(stopped / "metrics.jsonl")
        assert [r["step"] for r in resumed] == list(range(1, 7)), name
        for a, b in zip(full_rows[keep_step:], resumed[keep_step:]):
            assert without_timing(a) == without_timing(b), name
        assert read_jsonl(stopped / "eval.jsonl") == full_evals, name


def test_bad_input_errors_are_clear(tmp_path, warm):
    p = run_script("sparse_to_dense.py", *SHORT, "--stages", "2b,2a", "--output-dir", str(tmp_path / "a"), check=False)
    assert p.returncode != 0 and "--stages '2b,2a'" in p.stderr
    p = run_script("sparse_to_dense.py", *SHORT, "--rollout", "vllm", "--output-dir", str(tmp_path / "b"), check=False)
    assert p.returncode != 0 and "Run --stages 1,2a first, then --stages 2b,3" in p.stderr
    p = run_script("sparse_to_dense.py", *SHORT, "--stages", "2b,3", "--rollout", "vllm", "--output-dir",
                   str(tmp_path / "c"), check=False, hide=("vllm",))
    assert p.returncode != 0 and "--rollout vllm needs vLLM" in p.stderr
    p = run_script("sparse_to_dense.py", *SHORT, "--steps-2a", "0", "--output-dir", str(tmp_path / "d"), check=False)
    assert p.returncode != 0 and "stage 2a has no length: give --steps-2a N, or --distill-epochs E > 0" in p.stderr
    (tmp_path / "e").mkdir()
    p = run_script("sparse_to_dense.py", *SHORT, "--resume", str(tmp_path / "e"), check=False)
    assert p.returncode != 0 and "no finished stage and no checkpoint" in p.stderr


def _kl_along_solutions(student_path, teacher_path, n=96):
    """Exact per-token KL(π_S‖π_T), averaged over the worked solutions of held-out problems: a fixed set of
    teacher-style sequences, so the number depends on the two models only (no sampling noise)."""
    import tiny
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(teacher_path)
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    rows = tiny.make_split("add,mul,lin", "test", n, 0)
    prompts = [common.encode_prompt(tok, r["problem"], "{problem}") for r in rows]
    resps = [tok(r["solution"], add_special_tokens=False).input_ids + [tok.eos_token_id] for r in rows]
    b = common.Batch.of(prompts, resps, tok.pad_token_id, "cpu")
    m = b.mask_BT[:, 1:].bool()
    with torch.no_grad():
        ls = student(input_ids=b.ids_BT).logits[:, :-1, :len(tok)][m]
        lt = teacher(input_ids=b.ids_BT).logits[:, :-1, :len(tok)][m]
    return common.kl_from_logits(ls, lt).mean().item()


def test_bridge_learns(tmp_path, warm):
    """The tiny preset's dense bridge alone (--stages 2a,2b on 1H: 10 forward-KL steps on teacher rollouts, then 10
    on-policy distillation steps, 4 prompts × 8 each, from the raw tiny:large teacher). Measured over seeds 0-2 with
    this command and --seed: held-out accuracy (mean avg@4 over the three families, 64 problems each) rose by
    0.060, 0.055 and 0.079 (0.060 for seed 0, which this test runs), and the exact reverse KL to the teacher along
    held-out worked solutions fell from 0.260 to 0.172, 0.160 and 0.154 (0.66x, 0.62x, 0.59x). The +0.03 and 0.75x
    thresholds leave the eval's run-to-run spread (about ±0.02) and a KL margin of 0.09 over the worst seed."""
    out = tmp_path / "run"
    run_script("sparse_to_dense.py", "--preset", "tiny", "--stages", "2a,2b", "--eval-limit", "64", "--save-every",
               "0", "--output-dir", str(out))
    evals = read_jsonl(out / "eval.jsonl")
    acc = {s: sum(e["avg@4"] for e in evals if e["step"] == s) / 3 for s in (0, 20)}
    assert acc[20] >= acc[0] + 0.03, acc
    teacher, start = warm["large"], warm["small"]
    kl_start, kl_end = _kl_along_solutions(start, teacher), _kl_along_solutions(out / "final", teacher)
    assert kl_end < 0.75 * kl_start, (kl_start, kl_end)
    rkl = [r["kl/reverse"] for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "2b"]
    assert all(math.isfinite(x) and x >= 0 for x in rkl)


def test_stage_one_makes_an_untrained_teacher_worth_distilling(tmp_path, warm):
    """The paper's precondition C1 and why stage 1 exists, in the world where it holds: tiny:base (the large
    architecture answering at once 80% of the time, held-out 0.180) is a teacher RL improves within stage 1 (30 GRPO
    steps at lr 1e-4: 0.533 ± 0.015 over seeds 0-2 in bench/sparse_to_dense_study.py --name sparse_to_dense_base).
    Distilled raw (stage 2a alone) it drags tiny:small from 0.284 to 0.110 ± 0.004; after stage 1 the same 10
    forward-KL steps lift it to 0.332 ± 0.009; paired by seed the gap is 0.22-0.24. This runs seed 0 and asserts
    a teacher gain of 0.2 and a student gap of 0.1, each less than half the smallest gap measured and far above
    the evaluation's spread (about ±0.02 at 4 × 64 samples per family)."""
    flags = ("--preset", "tiny", "--teacher", "tiny:base", "--teacher-lr", "1e-4", "--steps-1", "30", "--eval-limit",
             "64", "--save-every", "0")
    # --eval-every beyond every stage's length: the starting models and each stage's end are evaluated
    run_script("sparse_to_dense.py", *flags, "--stages", "1,2a", "--eval-every", "1000",
               "--output-dir", str(tmp_path / "rl_first"))
    run_script("sparse_to_dense.py", *flags, "--stages", "2a", "--eval-every", "0", "--output-dir", str(tmp_path / "raw"))

    def acc(run, stage):
        res = json.loads((run / f"stage_{stage}.json").read_text())["eval"]
        return sum(r["avg@4"] for r in res.values()) / len(res)

    start = [r["avg@4"] for r in read_jsonl(tmp_path / "rl_first" / "eval.jsonl")
             if r["step"] == 0 and r.get("tag") == "teacher"]
    teacher_start, teacher_after = sum(start) / len(start), acc(tmp_path / "rl_first", "1")
    assert teacher_after >= teacher_start + 0.2, (teacher_start, teacher_after)
    gap = acc(tmp_path / "rl_first", "2a") - acc(tmp_path / "raw", "2a")
    assert gap >= 0.1, gap
