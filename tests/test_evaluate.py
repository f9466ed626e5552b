"""evaluate.py: any model through the training scripts' evaluation protocol, without training."""

from conftest import finite, read_jsonl, run_script

TINY = ("--preset", "tiny", "--eval-limit", "16", "--eval-samples", "4")


def test_evaluate_matches_the_training_scripts_evaluation(tmp_path, warm):
    """The same numbers as kdrl.py's own evaluation of the same model (same protocol, same seed): here a run with
    --total-steps 0, which evaluates and stops (it used to crash after evaluating, on a missing metrics.jsonl)."""
    run_script("evaluate.py", *TINY, "--model", str(warm["large"]), "--output-dir", str(tmp_path / "ev"))
    ev = read_jsonl(tmp_path / "ev" / "eval.jsonl")
    assert {r["benchmark"] for r in ev} == {"tiny_add", "tiny_mul", "tiny_lin"}
    assert all(finite(r) and r["step"] == 0 and 0 <= r["avg@4"] <= r["pass@4"] <= 1 for r in ev)
    assert all({"avg@4", "avg@4_se", "pass@1", "pass@4", "maj@4", "mean_length"} <= set(r) for r in ev)
    run_script("kdrl.py", *TINY, "--model", str(warm["large"]), "--teacher", "none", "--kd-coef", "0",
               "--total-steps", "0", "--output-dir", str(tmp_path / "train"))
    train = read_jsonl(tmp_path / "train" / "eval.jsonl")
    key = lambda rows: sorted(rows, key=lambda r: r["benchmark"])  # noqa: E731
    assert key(ev) == key(train)


def test_evaluate_under_torchrun_shards_the_problems(tmp_path, warm):
    run_script("evaluate.py", *TINY, "--model", "tiny:small", "--output-dir", str(tmp_path / "ev"), nproc=2)
    ev = read_jsonl(tmp_path / "ev" / "eval.jsonl")
    assert len(ev) == 3 and all(finite(r) for r in ev)  # rank 0 wrote every benchmark once, after the gather
