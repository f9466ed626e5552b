"""copd.py: the schedule, the cross-branch advantage, the merge and the O_k / symmetric-KL diagnostics against slow
references; end-to-end runs (python; torchrun with 2 ranks and 3 branches in hub and spokes; every baseline mode);
exact resume; clear errors on bad input; and learning on the tiny preset (the merge beats the base on both tasks)."""

import json

import pytest
import torch

import cli
import common
import copd
import engines
import runtime
import tiny
import verifiers
from conftest import SHARED_DATA, finite, read_jsonl, run_script, stop_after, without_timing

SMOKE = ("--preset", "tiny", "--total-steps", "4", "--s-rl", "1", "--s-opd", "1", "--prompts-per-step", "4",
         "--group-size", "4", "--eval-limit", "8", "--eval-samples", "2", "--diag-prompts", "4", "--save-every", "2")


def _args(*argv):
    return cli.parse_args(copd.Args, copd.PRESETS, ["--preset", "tiny", *argv])


def test_schedule_topology_and_batch_plan():
    a = _args("--s-rl", "3", "--s-opd", "2")
    assert "".join("R" if copd.phase_at(s, a) == "rl" else "O" for s in range(10)) == "RRROORRROO"
    assert copd.batch_plan(0, "rl", 2, a) == [("native", 0, 16)]
    assert copd.batch_plan(1, "opd", 2, a) == [("native", 1, 8), ("cross", 0, 8)]
    assert copd.batch_plan(0, "opd", 2, _args("--no-phase2-native-rl")) == [("cross", 1, 16)]
    assert copd.batch_plan(0, "rl", 2, _args("--mode", "mixed")) == [("native", 2, 16)]  # dataset K: the one pool
    assert copd.batch_plan(0, "rl", 2, _args("--mode", "mixed", "--mixed-pool", "stratified")) == \
        [("native", 0, 8), ("native", 1, 8)]
    # hub and spokes: the hub splits its cross budget over the spokes, a spoke learns from the hub only
    assert copd.teachers_of(0, 3, a) == [1, 2] and copd.teachers_of(2, 3, a) == [0]
    assert copd.batch_plan(0, "opd", 3, a) == [("native", 0, 8), ("cross", 1, 4), ("cross", 2, 4)]
    assert copd.teachers_of(1, 4, _args("--hub", "1")) == [0, 2, 3]
    st = _args("--mode", "static_opd", "--static-student", "0", "--total-steps", "10")
    assert [copd.phase_at(s, st) for s in (0, 9, 10, 13)] == ["rl", "rl", "static", "static"]
    assert copd.batch_plan(0, "static", 2, st) == [("cross", 1, 16)]
    assert {copd.phase_at(s, _args("--mode", "experts")) for s in range(20)} == {"rl"}
    # MOPD: the K experts train, then a fresh student (model K) learns from all of them on all their datasets
    mo = _args("--mode", "mopd", "--total-steps", "10", "--train-data", "tiny:add", "tiny:lin", "tiny:mul")
    assert [copd.phase_at(s, mo) for s in (0, 9, 10, 19)] == ["rl", "rl", "static", "static"]
    assert copd.students_at("rl", 3, mo) == [0, 1, 2] and copd.students_at("static", 3, mo) == [3]
    assert copd.batch_plan(3, "static", 3, mo) == [("cross", 0, 5), ("cross", 1, 5), ("cross", 2, 5)]
    assert copd.plan(mo, world=1).total == 20 and copd.plan(mo, world=1).n_models == 4


def test_interference_world_targets_are_boxed_or_tagged_and_each_verifier_takes_one():
    """tiny:formats' warm-start targets: the worked solution with its answer boxed, or tagged instead (below the
    habit's share); the `add` branch's verifier (boxed) reads only the first, the `lin` branch's (math_tag) the second."""
    size = tiny.SIZES["formats"]
    for fam in ("add", "lin"):
        row = tiny.make_split(fam, "train", 1, seed=0)[0]
        tagged, boxed = tiny._target(size, row, 0.2), tiny._target(size, row, 0.8)
        assert boxed == row["solution"] and tagged.endswith(f"<answer>{row['answer']}</answer>")
        assert tagged.split(" <answer>")[0] == row["solution"].rsplit(" \\boxed{", 1)[0]
        assert verifiers.extract_answer(boxed, "boxed") == row["answer"] and verifiers.extract_answer(tagged) is None
        assert verifiers.extract_answer(tagged, "answer_tag") == row["answer"]
        assert verifiers.extract_answer(boxed, "answer_tag") is None
    assert tiny._target(size, tiny.make_split("mul", "train", 1, seed=0)[0], 0.2).endswith("}")  # mul: no habit


def test_cue_worlds_reword_add_behind_a_cue_and_keep_each_sum_on_one_side_of_the_split():
    """tiny:cue_*: `add_dot` and `add_word` ask the `add` problems in other words (one token apart for add_dot), so
    the prompt's wording is the only cue; a sum held out of one family is held out of all three, and the `think`
    habit writes an R1-style answer that only the tag verifier reads."""
    import random
    tok = tiny.build_tokenizer()
    for seed in range(64):
        add = tiny._add(random.Random(seed))[0]
        dot, word = (tiny.TASKS[f](random.Random(seed))[0] for f in ("add_dot", "add_word"))
        a, d = tok(add).input_ids, tok(dot).input_ids
        assert len(a) == len(d) and sum(x != y for x, y in zip(a, d)) == 1, (add, dot)
        assert word.startswith("Compute ") and word.split()[-1][:-1] == add.split()[-1][:-1]
        assert tiny._is_test(dot, "add_dot") == tiny._is_test(word, "add_word") == tiny._is_test(add)
    test_sums = {r["problem"].split()[-1][:-1] for r in tiny.make_split("add", "test", 64, seed=0)}
    train_sums = {r["problem"].split()[-1][:-1] for r in tiny.make_split("add_dot,add_word", "train", 512, seed=0)}
    assert not test_sums & train_sums
    row = tiny.make_split("add_dot", "train", 1, seed=0)[0]
    think, boxed = tiny._target(tiny.SIZES["cue_think"], row, 0.2), tiny._target(tiny.SIZES["cue_think"], row, 0.8)
    assert think.startswith("<think> ") and boxed == row["solution"]
    assert verifiers.extract_answer(think, "answer_tag") == row["answer"] and verifiers.extract_answer(think) is None


def test_mixed_draws_from_one_pool_of_all_data_each_row_in_its_own_template():
    """Mixed RLVR's default batch is a draw from one shuffled pool of every dataset (§4.1), so a batch's share of
    each dataset varies from step to step; each row keeps its dataset's prompt template and verifier (`branch`)."""
    a = _args("--mode", "mixed", "--prompt-template", "A: {problem}", "B: {problem}", "--eval-data", "tiny_add")
    cfg = copd.plan(a, world=1)
    rows, _, streams = copd.load_data(a, cfg, runtime.Dist(0, 1, 0, torch.device("cpu")))
    assert len(rows[2]) == len(rows[0]) + len(rows[1])
    assert all(r["problem"] == cfg.prompt_template[r["branch"]].format(problem=s["problem"])
               for r, s in zip(rows[2], rows[0] + rows[1]))
    assert common.encode_prompt(tiny.build_tokenizer(), rows[2][0]["problem"], cfg.prompt_template[2]) == \
        common.encode_prompt(tiny.build_tokenizer(), rows[0][0]["problem"], "A: {problem}")
    shares = [sum(r["branch"] == 0 for r in copd.take(streams["own2"], 16)) for _ in range(20)]
    assert len(set(shares)) > 2 and 0.4 < sum(shares) / (20 * 16) < 0.6, shares  # not 8 of 16 every step


def test_update_averages_the_token_means_of_native_and_cross_sequences_alike():
    """Eq. (rlvr)'s (1/G) Σ_i (1/|y_i|) Σ_t over the combined native + cross batch (the default --loss-agg): one
    on-policy update with SGD moves the weights by −lr times the gradient of −(1/N) Σ_b (1/|y_b|) Σ_t A_bt log π(y_bt)
    over all N sequences of both parts, whatever their lengths; token-mean would weigh long sequences more."""
    tok = tiny.build_tokenizer()
    vocab = len(tok)
    prompts, resps, batch = _batch(tok, n=6, seed=3)
    assert len({len(r) for r in resps}) > 2  # lengths differ: the two aggregations disagree
    native, cross = common.Batch(batch.ids_BT[:4], batch.mask_BT[:4]), common.Batch(batch.ids_BT[4:], batch.mask_BT[4:])
    g = torch.Generator().manual_seed(0)
    adv_B, teacher_BT = torch.randn(4, generator=g), torch.randn(2, batch.T, generator=g) - 2

    def parts():
        def ro(b):
            comps = [engines.Completion(resps[i], [0.0] * len(resps[i]), True) for i in b]
            return engines.Rollouts([{}] * len(b), [prompts[i] for i in b], comps, [""] * len(b), 2)
        return [copd.Part("native", 0, ro(range(4)), native, correct_B=torch.tensor([1.0, 0, 1, 1]), adv_B=adv_B),
                copd.Part("cross", 1, ro(range(4, 6)), cross, teacher_logp_BT=teacher_BT)]

    def delta(agg):
        model = tiny.build_model("small", tok, seed=1)
        before = [p.detach().clone() for p in model.parameters()]
        a = _args("--group-size", "2", "--max-grad-norm", "1e9", "--loss-agg", agg, "--temperature", "1.0")
        copd.train_branch(model, torch.optim.SGD(model.parameters(), lr=1.0), parts(), 0.5, vocab, a, "cpu")
        return [p.detach() - b for p, b in zip(model.parameters(), before)]

    model = tiny.build_model("small", tok, seed=1)
    logp_BT = common.token_logprobs(model, batch, vocab)[0]
    adv_BT = torch.cat([adv_B[:, None].expand(4, batch.T), 0.5 * (teacher_BT - logp_BT[4:].detach())])
    ref = -((adv_BT * logp_BT * batch.mask_BT).sum(1) / batch.mask_BT.sum(1)).mean()
    grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    got = delta("seq-mean-token-mean")
    for d_, g_ in zip(got, grads):
        torch.testing.assert_close(d_, torch.zeros_like(d_) if g_ is None else -g_, atol=2e-6, rtol=1e-4)
    assert copd.Args.loss_agg == "seq-mean-token-mean"
    assert max((a - b).abs().max() for a, b in zip(got, delta("token-mean"))) > 1e-4


@pytest.mark.skipif(not (SHARED_DATA / "hmmt25.jsonl").exists(), reason=f"benchmark data not found at {SHARED_DATA} "
                    "(it sits beside a development checkout, not in a user's clone)")
def test_hmmt25_loads_from_the_benchmark_folder_and_its_golds_grade_correct_against_themselves():
    """HMMT February 2025, one of the paper's five text benchmarks (§4.1), is in the paper preset's --eval-data and
    loads offline by name from --eval-data-dir (the hub dataset MathArena/hmmt_feb_2025 has the same columns)."""
    assert "hmmt25" in copd.Args.eval_data.split(",") and common.BENCHMARKS["hmmt25"][1:] == ("train", "problem", "answer")
    rows = common.load_benchmarks("hmmt25", str(SHARED_DATA))["hmmt25"]
    assert len(rows) == 30 and all(r["problem"] and r["answer"] for r in rows)
    grader = verifiers.Grader(workers=2, timeout_s=3.0)
    try:
        got = grader([f"So the answer is $\\boxed{{{r['answer']}}}$." for r in rows], [r["answer"] for r in rows])
    finally:
        grader.close()
    assert got == [1.0] * 30, [r["answer"] for r, g in zip(rows, got) if g != 1.0]


def _tiny_pair():
    tok = tiny.build_tokenizer()
    return tok, tiny.build_model("small", tok, seed=1).eval(), tiny.build_model("small", tok, seed=2).eval()


def _batch(tok, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, len(tok), (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    resps = [torch.randint(3, len(tok), (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)]
    return prompts, resps, common.Batch.of(prompts, resps, tok.pad_token_id, "cpu")


def test_cross_advantage_matches_a_per_token_loop():
    """β·(log π_teacher − log π_student) of each sampled token, each prefix run through both models separately."""
    tok, student, teacher = _tiny_pair()
    prompts, resps, batch = _batch(tok)
    vocab = len(tok)
    with torch.no_grad():
        s_BT = common.token_logprobs(student, batch, vocab)[0]
        t_BT = common.token_logprobs(teacher, batch, vocab)[0]
        adv_BT = copd.cross_advantages(t_BT, s_BT, 0.7)
        for b, (p, r) in enumerate(zip(prompts, resps)):
            seq = p + r
            for t in range(len(p), len(seq)):
                ctx = torch.tensor([seq[:t]])
                lp_s = student(input_ids=ctx).logits[0, -1, :vocab].log_softmax(-1)[seq[t]]
                lp_t = teacher(input_ids=ctx).logits[0, -1, :vocab].log_softmax(-1)[seq[t]]
                torch.testing.assert_close(adv_BT[b, t], 0.7 * (lp_t - lp_s), atol=1e-5, rtol=1e-4)
        assert (adv_BT * (1 - batch.mask_BT)).abs().max() == 0  # nothing off the response
    # detached: the advantage carries no gradient back into either model
    logp = s_BT.clone().requires_grad_()
    assert not copd.cross_advantages(t_BT, logp, 1.0).requires_grad


def test_overlap_and_symmetric_kl_match_a_slow_reference():
    torch.manual_seed(0)
    N, H, V, k = 13, 8, 30, 10
    h_a, h_b = torch.randn(N, H), torch.randn(N, H)
    head_a, head_b = torch.nn.Linear(H, V + 4, bias=True), torch.nn.Linear(H, V + 6, bias=False)
    with torch.no_grad():
        head_b.weight[:V] = head_a.weight[:V] + 0.3 * torch.randn(V, H)  # related, not identical
        o_N, kl_N = copd.overlap_and_sym_kl(h_a, head_a, h_b, head_b, V, k, chunk=4)
        for n in range(N):
            la = head_a(h_a[n])[:V]
            lb = head_b(h_b[n])[:V]
            top_a = set(sorted(range(V), key=lambda v: -la[v].item())[:k])
            top_b = set(sorted(range(V), key=lambda v: -lb[v].item())[:k])
            assert o_N[n].item() == pytest.approx(len(top_a & top_b) / k)
            p, q = la.softmax(-1), lb.softmax(-1)
            kl = sum(p[v] * (p[v] / q[v]).log() + q[v] * (q[v] / p[v]).log() for v in range(V))
            assert kl_N[n].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
        same_o, same_kl = copd.overlap_and_sym_kl(h_a, head_a, h_a, head_a, V, k, chunk=5)
        assert torch.all(same_o == 1) and same_kl.abs().max() < 1e-5


def test_merge_matches_a_weighted_average():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)) for _ in range(3)]
    want = {n: sum(w * dict(m.named_parameters())[n] for w, m in zip((0.5, 0.3, 0.2), models)).detach().clone()
            for n, _ in models[0].named_parameters()}
    uniform = {n: torch.stack([dict(m.named_parameters())[n] for m in models]).mean(0).detach().clone()
               for n, _ in models[0].named_parameters()}
    target = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    copd.merge_into(target, models, [1 / 3] * 3)
    for n, p in target.named_parameters():
        torch.testing.assert_close(p, uniform[n])
    copd.merge_into(models[0], models, [0.5, 0.3, 0.2])  # in place, into one of the branches
    for n, p in models[0].named_parameters():
        torch.testing.assert_close(p, want[n])


def _load_sd(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def _check_run(out, steps, branches, tags, more_evals=frozenset()):
    for name in ("config.json", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "curves.png", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json"):
        assert (out / name).exists(), name
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(finite(r) for r in rows)
    for key in ("reward/mean", "loss/total", "phase", "policy/entropy", "timing_s/rollout", "perf/tokens_per_s",
                "response/mean_length", *[f"branch{k}/reward" for k in range(branches)]):
        assert key in rows[0], key
    evals = read_jsonl(out / "eval.jsonl")
    assert {(e["step"], e.get("tag", "")) for e in evals} == {(0, ""), (steps, "")} | {(steps, t) for t in tags} | \
        more_evals
    assert all(finite(e) and 0 <= e["avg@2"] <= 1 for e in evals)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "final")
    return rows


def test_end_to_end_python(tmp_path, warm):
    out = tmp_path / "run"
    run_script("copd.py", *SMOKE, "--output-dir", str(out))
    rows = _check_run(out, 4, 2, ["branch0", "branch1"])
    assert [r["phase"] for r in rows] == [0.0, 1.0, 0.0, 1.0]
    assert all("kl/teacher" in r and "branch0/cross_token_frac" in r for r in rows if r["phase"] == 1.0)
    assert all("diag/overlap_top10" in r and 0 <= r["diag/overlap_top10"] <= 1 and r["diag/sym_kl"] >= 0 for r in rows)
    # the final model is the uniform average of the two saved branches, tensor by tensor
    final, b0, b1 = (_load_sd(p) for p in (out / "final", out / "branches/branch0", out / "branches/branch1"))
    assert set(final) == set(b0) == set(b1)
    assert any(not torch.equal(b0[n], b1[n]) for n in b0)  # the branches did diverge
    for n in final:
        torch.testing.assert_close(final[n], (b0[n] + b1[n]) / 2)


def test_end_to_end_torchrun_two_ranks_three_branches(tmp_path, warm):
    """Hub and spokes (K = 3, hub 0) on 2 gloo ranks: every branch sharded, prompts split by rank."""
    out = tmp_path / "run"
    run_script("copd.py", *SMOKE, "--prompts-per-step", "8", "--train-data", "tiny:add", "tiny:lin", "tiny:mul",
               "--output-dir", str(out), nproc=2)
    rows = _check_run(out, 4, 3, ["branch0", "branch1", "branch2"])
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert {"diag/overlap_top10/0-1", "diag/overlap_top10/0-2", "diag/sym_kl/0-2"} <= set(rows[-1])
    assert "diag/sym_kl/1-2" not in rows[-1]  # spokes are not paired with each other
    sds = [_load_sd(out / f"branches/branch{k}") for k in range(3)]
    for n, v in _load_sd(out / "final").items():
        torch.testing.assert_close(v, sum(sd[n] for sd in sds) / 3)


@pytest.mark.parametrize("mode,steps,tags", [("experts", 2, ["branch0", "branch1"]), ("mixed", 4, []),
                                             ("static_opd", 3, ["branch0", "branch1"]),
                                             ("mopd", 3, ["branch0", "branch1"])])
def test_baseline_modes(tmp_path, warm, mode, steps, tags):
    """Matched total steps: experts 2 × T, mixed K·T on one model, static_opd and mopd T per expert + T_opd."""
    out = tmp_path / mode
    run_script("copd.py", *SMOKE, "--total-steps", "2", "--mode", mode, "--static-opd-steps", "1", "--save-every", "0",
               "--output-dir", str(out))
    experts_evals = {(2, "branch0"), (2, "branch1")} if mode == "static_opd" else set()  # the experts, before OPD
    rows = _check_run(out, steps, 1 if mode == "mixed" else 2, tags, experts_evals)
    if mode == "static_opd":
        assert [r["phase"] for r in rows] == [0.0, 0.0, 2.0]
        assert "branch1/kl_teacher" in rows[-1] and "branch0/loss" not in rows[-1]  # only the student learns
        b0 = _load_sd(out / "branches/branch0")
        for n, v in _load_sd(out / "final").items():
            torch.testing.assert_close(v, _load_sd(out / "branches/branch1")[n])
        assert any(not torch.equal(b0[n], v) for n, v in _load_sd(out / "final").items())
    if mode == "mopd":  # only the student updates in the OPD stage; it starts at π_0 and ends away from all three
        assert [r["phase"] for r in rows] == [0.0, 0.0, 2.0]
        assert "branch2/kl_teacher" in rows[-1] and not any(k.startswith(("branch0/", "branch1/")) for k in rows[-1])
        assert rows[-1]["branch2/cross_token_frac"] == 1.0 and "diag/sym_kl/2-0" in rows[-1]
        base = _load_sd(tiny.warm_start("habits"))
        final, experts = _load_sd(out / "final"), [_load_sd(out / f"branches/branch{k}") for k in (0, 1)]
        assert not (out / "branches/branch2").exists()
        for sd in (base, *experts):
            assert any(not torch.equal(sd[n], v) for n, v in final.items())
    if mode == "mixed":
        assert not (out / "branches").exists() and all(r["phase"] == 0.0 for r in rows)
        assert "branch0/reward" in rows[0] and "branch1/reward" not in rows[0]


def test_static_opd_from_a_given_teacher(tmp_path, warm):
    """--static-teacher with --total-steps 0 (bench/copd_pilot.py's OPD runs): the teacher branch starts from the given
    weights and stays frozen while the student, --model, learns for T_opd steps by pure OPD."""
    out = tmp_path / "run"
    run_script("copd.py", *SMOKE, "--mode", "static_opd", "--total-steps", "0", "--static-opd-steps", "2",
               "--static-teacher", "tiny:small", "--static-student", "0", "--save-every", "0", "--output-dir", str(out))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["phase"] for r in rows] == [2.0, 2.0] and "branch0/kl_teacher" in rows[-1] and "reward/mean" not in rows[0]
    assert {(e["step"], e.get("tag", "")) for e in read_jsonl(out / "eval.jsonl")} == \
        {(0, ""), (2, ""), (2, "branch0"), (2, "branch1")}
    teacher, student, base = (_load_sd(p) for p in (out / "branches/branch1", out / "final", tiny.warm_start("habits")))
    for n, v in _load_sd(tiny.warm_start("small")).items():
        torch.testing.assert_close(teacher[n], v, atol=0, rtol=0)
    assert any(not torch.equal(base[n], v) for n, v in student.items())


def test_code_branch_end_to_end(tmp_path, warm):
    """A math branch and a code branch (the paper preset's layout) on the toy model: the code branch's prompts, its
    sandboxed pytest reward and its held-out benchmark (`code:<file>`) run end to end. The toy model writes no code,
    so its code reward is 0; the verifier itself is tested in test_code_verifier.py."""
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"question": f"Write f() returning {i}.",
                                        "test": f"from solution import f\n\ndef test_f():\n    assert f() == {i}\n"})
                            + "\n" for i in range(12)))
    out = tmp_path / "run"
    run_script("copd.py", *SMOKE, "--total-steps", "2", "--save-every", "0", "--train-data", "tiny:add", str(data),
               "--verifiers", "math", "code", "--problem-key", "problem", "question", "--answer-key", "answer", "test",
               "--code-heldout", "4", "--code-timeout", "5", "--code-workers", "2", "--output-dir", str(out))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["branch1/reward"] for r in rows] == [0.0, 0.0] and "kl/teacher" in rows[1]
    evals = read_jsonl(out / "eval.jsonl")
    assert {e["benchmark"] for e in evals} == {"tiny_add", "tiny_lin", f"code:{data}"}
    assert all(e["avg@2"] == 0 for e in evals if e["benchmark"].startswith("code:"))


def test_resume_continues_exactly(tmp_path, warm):
    """A run stopped after its step-3 checkpoint (inside Phase II) and resumed logs the same later metrics as the
    run that was never stopped: both branches, both optimizers, every prompt stream and the rollout seeds."""
    args = ("--preset", "tiny", "--total-steps", "5", "--s-rl", "2", "--s-opd", "2", "--save-every", "3",
            "--eval-every", "0", "--eval-limit", "8", "--eval-samples", "1", "--prompts-per-step", "4",
            "--group-size", "4", "--diag-prompts", "4")
    run_script("copd.py", *args, "--output-dir", str(tmp_path / "full"))
    stopped = tmp_path / "stopped"
    stop_after(tmp_path / "full", stopped, 3)
    full_rows = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    run_script("copd.py", *args, "--resume", str(stopped))
    resumed = read_jsonl(stopped / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 6))

    for a, b in zip(full_rows[3:], resumed[3:]):
        assert without_timing(a) == without_timing(b)


def test_bad_input_errors_are_clear(tmp_path, warm):
    cases = [
        (("--train-data", "tiny:add"), "needs K ≥ 2 datasets"),
        (("--verifiers", "math", "python"), "verifiers 'math', 'math_tag' or 'code'"),
        (("--eval-verifiers", "math"), "--eval-verifiers needs one verifier per --eval-data benchmark"),
        (("--beta", "1", "2", "3"), "--beta has 3 values for 2 branches"),
        (("--merge-weights", "1", "0", "0"), "--merge-weights has 3 values for 2 branches"),
        (("--cross-frac", "0"), "0 cross prompts of dataset 1, which must be a positive multiple of the world size"),
        (("--prompts-per-step", "6"), "3 native prompts of dataset 0, which must be a positive multiple of the world"),
        (("--mode", "static_opd", "--train-data", "tiny:add", "tiny:lin", "tiny:mul"), "defined for two experts"),
        (("--hub", "5", "--train-data", "tiny:add", "tiny:lin", "tiny:mul"), "--hub 5 is not a branch"),
        (("--diag-prompts", "5"), "--diag-prompts 5 does not divide by the world size 2"),
        (("--static-teacher", "tiny:small"), "--static-teacher is for --mode static_opd"),
        (("--mode", "static_opd", "--static-teacher", "tiny:small", "--total-steps", "0"), "give --static-opd-steps"),
    ]
    for extra, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
            copd.plan(_args(*extra), world=2)
    assert copd.plan(_args(), world=2).total == 40
    assert copd.plan(_args("--mode", "static_opd"), world=2).total == 40 + 16   # T_opd = 40·4/10
    assert copd.plan(_args("--mode", "mopd"), world=2).total == 40 + 40         # T_opd = T: the student starts at π_0
    # a bad flag in a real launch fails before any model is loaded, with the same message
    p = run_script("copd.py", "--preset", "tiny", "--beta", "1", "2", "3", "--output-dir", str(tmp_path / "x"),
                   check=False)
    assert p.returncode != 0 and "--beta has 3 values for 2 branches" in p.stderr


def test_tiny_preset_learns(tmp_path, warm):
    """The tiny run of docs/copd.md: CoPD on `add` and `lin` from `tiny:habits`, 2 branches × 40 steps. Measured over seeds
    0-2 (bench/copd_study.py, the current defaults), the merged model gained +0.21 to +0.28 on add and +0.20 to +0.25
    on lin (held-out avg@4, 512 samples per family, whose run-to-run spread is about ±0.03); the +0.12 thresholds keep
    at least twice that spread below the smallest measured gain. Mutual OPD pulled the branches back together in
    every seed: the mean symmetric KL at the end of the Phase-II blocks was 0.54-0.74 of that at the end of the
    Phase-I blocks, and O_10 never fell below 0.93."""
    out = tmp_path / "run"
    run_script("copd.py", "--preset", "tiny", "--output-dir", str(out), "--save-every", "0")
    evals = read_jsonl(out / "eval.jsonl")
    acc = {(e["step"], e["benchmark"]): e["avg@4"] for e in evals if not e.get("tag")}
    assert acc[(40, "tiny_add")] >= acc[(0, "tiny_add")] + 0.12, acc
    assert acc[(40, "tiny_lin")] >= acc[(0, "tiny_lin")] + 0.12, acc
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "diag/sym_kl" in r]
    after_rl = [r["diag/sym_kl"] for r in rows if r["step"] % 10 == 6]
    after_opd = [r["diag/sym_kl"] for r in rows if r["step"] % 10 == 0]
    assert len(after_rl) == len(after_opd) == 4 and sum(after_opd) < sum(after_rl), (after_rl, after_opd)
    assert min(r["diag/overlap_top10"] for r in rows) > 0.9
