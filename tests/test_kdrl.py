"""kdrl.py: the loss against its definition, end-to-end runs (python and 2-rank torchrun), learning, exact resume,
and clear errors on bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
import common
import kdrl
import runtime
from conftest import ROOT, finite, read_jsonl, run_script, stop_after, without_timing

SMOKE = ("--preset", "tiny", "--total-steps", "4", "--eval-every", "2", "--save-every", "2", "--eval-limit", "16",
         "--eval-samples", "2", "--prompts-per-step", "4", "--group-size", "4")


def _args(**kw):
    return cli.parse_args(kdrl.Args, kdrl.PRESETS, ["--preset", "tiny"] + [
        x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))])


def test_k2_loss_and_k1_advantage_give_the_same_gradient():
    """At ratio 1, β·½(logp_S − logp_T)² as a loss and A + β·(logp_T − logp_S) as an advantage have the same
    gradient (the equivalence behind writing KDRL as Â + β·d_t)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (6, 5))
    t_logp = torch.randn(6, 5).clamp(max=-0.1)
    mask = (torch.rand(6, 5) > 0.2).float()
    adv, kdm = torch.randn(6), (torch.rand(6) > 0.3).float()
    norm = common.LossNorm(tokens=mask.sum().item(), seqs=6, max_len=5)
    grads = {}
    for est in ("k2", "k1"):
        lp = logits.log_softmax(-1).gather(2, ids[..., None]).squeeze(2)
        loss, *_ = kdrl.kdrl_loss(lp, lp.detach(), t_logp, adv, kdm, mask, 0.3, norm, _args(kd_estimator=est))
        grads[est] = torch.autograd.grad(loss, logits)[0]
    torch.testing.assert_close(grads["k2"], grads["k1"])


def test_kd_schedule_and_masks():
    a = _args(kd_coef=5e-3, kd_coef_min=1e-3, kd_coef_delta=5e-5, kd_schedule="linear")
    assert [round(kdrl.kd_coef_at(t, a), 8) for t in (0, 40, 80, 200)] == [5e-3, 3e-3, 1e-3, 1e-3]
    assert kdrl.kd_coef_at(200, _args(kd_coef=5e-3, kd_schedule="constant")) == 5e-3
    c = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert kdrl.kd_mask(c, "none").tolist() == [[1, 1], [1, 1]]
    assert kdrl.kd_mask(c, "incorrect").tolist() == [[0, 1], [1, 1]]
    assert kdrl.kd_mask(c, "group_all_wrong").tolist() == [[0, 0], [1, 1]]


def test_rl_coef_zero_is_pure_kd_and_kd_coef_zero_is_grpo():
    torch.manual_seed(1)
    lp = torch.randn(3, 4).clamp(max=-0.1).requires_grad_()
    t, mask, adv = torch.randn(3, 4).clamp(max=-0.1), torch.ones(3, 4), torch.randn(3)
    norm = common.LossNorm(12, 3, 4)
    loss, l_pg, l_kd, *_ = kdrl.kdrl_loss(lp, lp.detach(), t, adv, torch.ones(3), mask, 0.2, norm, _args(rl_coef=0))
    assert abs(l_pg.item()) < 1e-7 and torch.allclose(loss, 0.2 * l_kd)
    loss, l_pg, l_kd, *_ = kdrl.kdrl_loss(lp, lp.detach(), t, adv, torch.ones(3), mask, 0.0, norm, _args())
    assert torch.allclose(loss, l_pg)


def _check_run(out, steps):
    for name in ("config.json", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "curves.png", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json"):
        assert (out / name).exists(), name
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(finite(r) for r in rows)
    for key in ("reward/mean", "kl/teacher", "loss/total", "loss/pg", "loss/kd", "kd/coef", "policy/entropy",
                "timing_s/rollout", "timing_s/teacher", "perf/tokens_per_s", "response/mean_length"):
        assert key in rows[0], key
    evals = read_jsonl(out / "eval.jsonl")
    assert {e["step"] for e in evals} == set(range(0, steps + 1, 2))
    assert {e["benchmark"] for e in evals} == {"tiny_add", "tiny_mul", "tiny_lin"}
    assert all(finite(e) and 0 <= e["avg@2"] <= 1 for e in evals)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["args"]["model"] == "tiny:small" and cfg["args"]["total_steps"] == steps
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")


def test_end_to_end_python(tmp_path, warm):
    run_script("kdrl.py", *SMOKE, "--output-dir", str(tmp_path / "run"))
    _check_run(tmp_path / "run", 4)


def test_end_to_end_torchrun_two_ranks(tmp_path, warm):
    run_script("kdrl.py", *SMOKE, "--output-dir", str(tmp_path / "run"), "--kd-estimator", "full", nproc=2)
    _check_run(tmp_path / "run", 4)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2


def test_resume_continues_exactly(tmp_path, warm):
    """A run stopped after its step-3 checkpoint and resumed logs the same later metrics as the run that was never
    stopped (timings aside): model, optimizer, data position and rollout seeds all come back."""
    args = ("--preset", "tiny", "--total-steps", "6", "--save-every", "3", "--eval-every", "0", "--eval-limit", "8",
            "--eval-samples", "1", "--prompts-per-step", "4", "--group-size", "4")
    run_script("kdrl.py", *args, "--output-dir", str(tmp_path / "full"))
    stopped = tmp_path / "stopped"
    stop_after(tmp_path / "full", stopped, 3)
    full_rows = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    run_script("kdrl.py", *args, "--resume", str(stopped))
    resumed = read_jsonl(stopped / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))

    for a, b in zip(full_rows[3:], resumed[3:]):
        assert without_timing(a) == without_timing(b)


def test_bad_input_errors_are_clear(tmp_path, warm):
    # a batch that does not divide by the world size
    with pytest.raises(ValueError, match="does not divide by the world size 2"):
        common.PromptStream([{"problem": "x", "answer": "1"}] * 10, 3, 0, 2, 0)
    # a dataset without the expected column
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n')
    with pytest.raises(KeyError, match="no column 'problem'.*--problem-key"):
        common.load_problems(str(bad))
    # a teacher with another tokenizer
    import tiny
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(warm["small"])
    with pytest.raises(ValueError, match="different tokenizers"):
        runtime.check_same_tokenizer(tok, tiny.build_tokenizer(vocab_size=300), "--model", "--teacher")
    # --rollout vllm on a machine without vLLM
    p = run_script("kdrl.py", *SMOKE, "--output-dir", str(tmp_path / "v"), "--rollout", "vllm", check=False,
                   hide=("vllm",))
    assert p.returncode != 0 and "--rollout vllm needs vLLM" in p.stderr
    # a hub name with no network: said at once
    t0 = time.monotonic()
    p = run_script("kdrl.py", *SMOKE, "--output-dir", str(tmp_path / "h"), "--teacher", "nobody/no-such-model",
                   check=False)
    assert p.returncode != 0 and "HF_HUB_OFFLINE=1" in p.stderr and time.monotonic() - t0 < 60
    # a corrupt checkpoint on --resume
    ck = tmp_path / "c" / "checkpoints" / "step_2"
    ck.mkdir(parents=True)
    (ck / "trainer_state.pt").write_bytes(b"not a checkpoint")
    p = run_script("kdrl.py", *SMOKE, "--resume", str(tmp_path / "c"), check=False)
    assert p.returncode != 0 and "not a complete checkpoint" in p.stderr


def test_resume_from_a_truncated_or_mismatched_checkpoint_names_the_problem(tmp_path, warm):
    """A truncated shard, or a checkpoint of another model shape, fails with one message naming the checkpoint; the
    raw torch error used to escape (CheckpointException derives from BaseException, past `except Exception`)."""
    run = tmp_path / "run"
    p = run_script("kdrl.py", "--preset", "tiny", "--total-steps", "2", "--eval-every", "0", "--eval-limit", "4",
                   "--eval-samples", "1", "--prompts-per-step", "4", "--group-size", "4", "--save-every", "1",
                   "--output-dir", str(run))
    assert "[step 2/2] reward/mean=" in p.stdout  # no terminal: one-line progress instead of a bar
    ck = run / "checkpoints" / "step_1"
    assert ck.exists()
    mask = os.umask(0)
    os.umask(mask)
    assert (run / "final" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # not 0600
    cfg = json.loads((run / "config.json").read_text())
    assert "git_dirty" in cfg  # whether the checkout had uncommitted changes (None outside a git checkout)
    # the checkpoint alone (no config.json to restore the run's arguments from), loaded into the large model
    other = tmp_path / "other" / "checkpoints" / "step_1"
    shutil.copytree(ck, other)
    p = run_script("kdrl.py", "--preset", "tiny", "--total-steps", "3", "--resume", str(other.parent.parent),
                   "--model", "tiny:large", "--prompts-per-step", "4", "--group-size", "4", check=False)
    assert p.returncode != 0 and f"checkpoint {other} cannot be loaded into this run" in p.stderr, p.stderr[-2000:]
    shard = next(ck.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # as a full disk or a killed copy leaves it
    p = run_script("kdrl.py", "--preset", "tiny", "--total-steps", "3", "--resume", str(run), "--prompts-per-step",
                   "4", "--group-size", "4", check=False)
    assert p.returncode != 0 and f"checkpoint {ck} cannot be loaded into this run" in p.stderr, p.stderr[-2000:]
    assert shard.name in p.stderr


@pytest.mark.parametrize("leftover", ["eval.jsonl", "samples.jsonl"])
def test_a_directory_holding_only_evaluations_is_refused(tmp_path, leftover):
    """A run that died in its first evaluation, or an evaluate.py run, leaves eval.jsonl without metrics.jsonl: a new
    run there would append its rows to the old ones, so it is refused like any used directory."""
    run = tmp_path / "run"
    run.mkdir()
    (run / leftover).write_text('{"step": 0}\n')
    p = run_script("kdrl.py", "--preset", "tiny", "--output-dir", str(run), check=False)
    assert p.returncode != 0 and f"--output-dir {run} already holds a run" in p.stderr
    assert (run / leftover).read_text() == '{"step": 0}\n'


def test_resume_restores_the_run_and_a_used_output_dir_is_refused(tmp_path, warm):
    """`--resume RUN` alone continues RUN with its own arguments (it used to fall back to the paper's 7B preset),
    keeps its config.json, and refuses a flag that would change what it computes; a new run into a directory that
    holds one is refused unless --overwrite empties it first."""
    run = tmp_path / "run"
    args = ("--preset", "tiny", "--total-steps", "2", "--eval-every", "0", "--eval-limit", "4", "--eval-samples", "1",
            "--prompts-per-step", "4", "--group-size", "4", "--save-every", "1")
    run_script("kdrl.py", *args, "--output-dir", str(run))
    original = (run / "config.json").read_text()
    run_script("kdrl.py", "--resume", str(run), "--total-steps", "3")  # no --preset: the run's own arguments
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert (run / "config.json").read_text() == original
    resumed = json.loads((run / "config.resumed_at_step_1.json").read_text())["args"]
    assert resumed["preset"] == "tiny" and resumed["total_steps"] == 3 and resumed["model"] == "tiny:small"
    p = run_script("kdrl.py", "--resume", str(run), "--lr", "1e-3", check=False)
    assert p.returncode == 2 and "--lr 0.001 differs from the resumed run's 0.0001" in p.stderr
    assert "Traceback" not in p.stderr
    p = run_script("kdrl.py", *args, "--output-dir", str(run), check=False)
    assert p.returncode != 0 and f"--output-dir {run} already holds a run" in p.stderr
    run_script("kdrl.py", *args, "--output-dir", str(run), "--overwrite", "--total-steps", "1")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    assert not (run / "checkpoints" / "step_1").exists() and not (run / "config.resumed_at_step_1.json").exists()


def test_a_run_killed_while_it_writes_a_checkpoint_resumes_from_the_previous_one(tmp_path, warm):
    """SIGKILL while the step-4 checkpoint is being written (the shim holds the write open): the half-written
    checkpoint is never taken for a complete one, and --resume continues from step 2 with the same later metrics
    as a run that was never killed."""
    args = ("--preset", "tiny", "--total-steps", "6", "--save-every", "2", "--eval-every", "0", "--eval-limit", "4",
            "--eval-samples", "1", "--prompts-per-step", "4", "--group-size", "4", "--keep-checkpoints", "3")
    run_script("kdrl.py", *args, "--output-dir", str(tmp_path / "full"))
    shim = ("import runpy, sys, time\n"
            "import torch.distributed.checkpoint as dcp\n"
            "save, n = dcp.save, [0]\n"
            "def slow_second_save(*a, **k):\n"
            "    n[0] += 1\n"
            "    out = save(*a, **k)\n"
            "    if n[0] == 2:\n"
            "        print('WRITING-CHECKPOINT', flush=True); time.sleep(600)\n"
            "    return out\n"
            "dcp.save = slow_second_save\n"
            "sys.argv = ['kdrl.py', *sys.argv[1:]]\n"
            "runpy.run_path('kdrl.py', run_name='__main__')\n")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-u", "-c", shim, *args, "--output-dir", str(killed)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:  # bounded: the run ends on its own (and the test fails below) if the shim never blocks
            if "WRITING-CHECKPOINT" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpts = killed / "checkpoints"
    assert (ckpts / "step_2").exists() and not (ckpts / "step_4").exists() and (ckpts / ".step_4.tmp").exists()
    run_script("kdrl.py", "--resume", str(killed))
    full, resumed = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(killed / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [without_timing(r) for r in resumed] == [without_timing(r) for r in full]


def test_config_replays_a_run(tmp_path, warm):
    """`--config RUN/config.json` restores every argument of RUN for a new run (explicit flags win): the replay logs
    the same metrics; a YAML file of arguments works the same way."""
    args = ("--preset", "tiny", "--total-steps", "2", "--eval-every", "0", "--eval-limit", "4", "--eval-samples", "1",
            "--prompts-per-step", "4", "--group-size", "4", "--save-every", "0", "--lr", "3e-4", "--kd-mask",
            "incorrect", "--seed", "3")
    run_script("kdrl.py", *args, "--output-dir", str(tmp_path / "a"))
    run_script("kdrl.py", "--config", str(tmp_path / "a" / "config.json"), "--output-dir", str(tmp_path / "b"))
    a, b = (read_jsonl(tmp_path / x / "metrics.jsonl") for x in "ab")
    assert [without_timing(r) for r in a] == [without_timing(r) for r in b]
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())["args"]
    assert cfg_b["lr"] == 3e-4 and cfg_b["kd_mask"] == "incorrect" and cfg_b["seed"] == 3
    (tmp_path / "c.yaml").write_text("preset: tiny\ntotal_steps: 1\nlr: 0.0003\nprompts_per_step: 4\ngroup_size: 4\n"
                                     "eval_every: 0\neval_limit: 4\neval_samples: 1\nsave_every: 0\n")
    run_script("kdrl.py", "--config", str(tmp_path / "c.yaml"), "--seed", "5", "--output-dir", str(tmp_path / "c"))
    cfg_c = json.loads((tmp_path / "c" / "config.json").read_text())["args"]
    assert cfg_c["lr"] == 3e-4 and cfg_c["seed"] == 5 and cfg_c["total_steps"] == 1  # the explicit --seed wins


def test_tiny_preset_learns(tmp_path, warm):
    """The tiny run of docs/kdrl.md: 40 KDRL steps on the CPU toy world. Measured over seeds 0-1 and both GRPO and KDRL
    settings, held-out accuracy (mean avg@4 over the three task families, 1,536 samples) rose by 0.08-0.10 and
    the token-level teacher KL fell to 0.28-0.35 of its first-10-step mean; the +0.04 and 0.6 thresholds leave
    twice the eval's run-to-run spread (about +-0.02) between them and the measured effect."""
    out = tmp_path / "run"
    run_script("kdrl.py", "--preset", "tiny", "--output-dir", str(out), "--eval-every", "20", "--save-every", "0")
    evals = read_jsonl(out / "eval.jsonl")
    acc = {s: sum(e["avg@4"] for e in evals if e["step"] == s) / 3 for s in (0, 40)}
    assert acc[40] >= acc[0] + 0.04, acc
    rows = read_jsonl(out / "metrics.jsonl")
    kl_first = sum(r["kl/teacher"] for r in rows[:10]) / 10
    kl_last = sum(r["kl/teacher"] for r in rows[-10:]) / 10
    assert kl_last < 0.6 * kl_first, (kl_first, kl_last)
