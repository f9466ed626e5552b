"""bench/gpu_check.py, the script a GPU box runs, at toy shapes on the CPU (`--device cpu --smoke`), so that it cannot
rot between GPU runs: every section runs and passes its own checks, and the JSON holds the figures docs/running.md names."""

import json

from conftest import run_script


def test_gpu_check_smoke_on_the_cpu(tmp_path, warm):
    out = tmp_path / "gpu_check.json"
    run_script("bench/gpu_check.py", "--device", "cpu", "--smoke", "--out", str(out), timeout=900)
    r = json.loads(out.read_text())
    assert r["ok"] and r["smoke"] and r["device"] == "cpu"
    assert {k for k, v in r["scripts"].items() if isinstance(v, dict)} == {
        f"{s}/hf" for s in ("kdrl", "codistill_grpo", "s2l_po", "copd", "sparse_to_dense")}
    assert all(v["steps"] >= 2 and v["finite"] and not v["missing_outputs"] for v in r["scripts"].values()
               if isinstance(v, dict))
    assert "kdrl/hf" in r["wide"] and (not r["vllm"] or "kdrl/vllm" in r["wide"])
    assert set(r["numerics"]["tolerances"]) <= set(r["numerics"])
    for key in ("update_tokens_per_s", "mfu_student", "teacher_forward_tokens_per_s", "matmul_peak_tflops"):
        assert r["perf"][key] > 0, key
    assert r["perf"]["rollout_tokens_per_s"]["hf"] > 0 and r["perf"]["peak_gib"]["update"] > 0
    assert r["chunked"]["vocab"] == 151_936 and r["chunked"]["logp_max_abs"] < 1e-3
