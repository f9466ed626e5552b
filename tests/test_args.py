"""Arguments are checked before anything loads: a bad one exits at once with one line naming the flag, exit code 2."""

import importlib

import pytest
from conftest import run_script

import cli

SCRIPTS = ("kdrl", "codistill_grpo", "s2l_po", "copd", "sparse_to_dense")


def _refused(script: str, out, *argv: str, env: dict | None = None) -> str:
    """Run `script --preset tiny ...` as a user would; it must refuse at once: exit 2, one clean error line, no
    traceback, and no run directory (nothing was loaded or written)."""
    p = run_script(f"{script}.py", "--preset", "tiny", "--output-dir", str(out), *argv, check=False, timeout=120,
                   env=env)
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}.py: error: "), p.stderr[-3000:]
    assert not out.exists() and not (out / "metrics.jsonl").exists()
    return last


@pytest.mark.parametrize("script,argv,env,expect", [
    ("kdrl", ("--group-size", "1"), None, "--group-size 1: GRPO needs at least 2 completions per prompt"),
    ("codistill_grpo", ("--group-size", "-4"), None, "--group-size -4: GRPO needs at least 2"),
    ("s2l_po", ("--micro-batch-size", "0"), None, "--micro-batch-size 0: must be at least 1"),
    ("sparse_to_dense", ("--distill-group-size", "0"), None, "--distill-group-size 0: must be at least 1"),
    ("copd", ("--total-steps", "-1"), None, "--total-steps -1: must be at least 0"),
    ("kdrl", (), dict(WORLD_SIZE="3", RANK="0", LOCAL_RANK="0"),
     "--prompts-per-step 16 does not divide by the world size 3 (WORLD_SIZE): use a multiple of 3, e.g. "
     "--prompts-per-step 15"),
    ("sparse_to_dense", ("--stages", "2a,2b"), dict(WORLD_SIZE="3", RANK="0", LOCAL_RANK="0"),
     "--distill-prompts-per-step 4 does not divide by the world size 3"),
    ("kdrl", ("--group-sise", "4"), None, "unknown flag --group-sise; did you mean --group-size?"),
    ("s2l_po", ("--alpha_strat=0.5",), None, "unknown flag --alpha_strat; did you mean --alpha-start?"),
    ("kdrl", ("--teacher", "nobody/not-a-cached-model"), dict(HF_HUB_OFFLINE="1"),
     "--teacher 'nobody/not-a-cached-model': HF_HUB_OFFLINE=1 and it is neither a local folder"),
    # the longest sequence (prompt + the larger response budget) must fit every model the run loads
    ("kdrl", ("--eval-max-new-tokens", "200"), None,
     "--model 'tiny:small' takes 256 positions (max_position_embeddings), but --max-prompt-tokens 64 + "
     "--eval-max-new-tokens 200 = 264 tokens: lower the budgets to sum to at most 256"),
    # a script's own rules run at parse time too, before the process group
    ("codistill_grpo", ("--large-rollout-frac", "0.3"), None, "--large-rollout-frac 0.3 × --group-size 8"),
    ("s2l_po", ("--t-mix", "-1"), None, "--t-mix -1"),
], ids=['group_size_1', 'group_size_negative', 'micro_batch_size_0', 'distill_group_size_0', 'total_steps_negative', 'world_size', 'world_size_distill', 'unknown_flag', 'unknown_flag_underscore', 'hub_offline', 'context_length', 'script_rule_codistill', 'script_rule_s2l'])
def test_bad_input_exits_at_once_with_one_line(tmp_path, script, argv, env, expect):
    assert expect in _refused(script, tmp_path / "run", *argv, env=env)


# The context (max_position_embeddings) of every model a preset names, from the models' public config.json files.
CONTEXT = {"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 131_072, "Skywork/Skywork-OR1-Math-7B": 131_072,
           "Qwen/Qwen2.5-Math-1.5B": 4_096, "Qwen/Qwen2.5-Math-7B": 4_096, "Qwen/Qwen2.5-Math-1.5B-Instruct": 4_096,
           "Qwen/Qwen2.5-Math-7B-Instruct": 4_096, "Qwen/Qwen2.5-0.5B": 32_768, "Qwen/Qwen2.5-1.5B": 32_768,
           "Qwen/Qwen2.5-1.5B-Instruct": 32_768, "Qwen/Qwen3-0.6B-Base": 32_768, "Qwen/Qwen3-1.7B-Base": 32_768,
           "Qwen/Qwen3-8B-Base": 32_768, "Qwen/Qwen3-0.6B": 40_960, "Qwen/Qwen3-1.7B": 40_960, "Qwen/Qwen3-8B": 40_960,
           "Qwen/Qwen3-4B-Instruct-2507": 262_144}


@pytest.mark.parametrize("script", (*SCRIPTS, "evaluate"))
def test_every_preset_parses(script, monkeypatch):
    """Every preset of every script passes the checks (online, as on a machine with the hub; one rank), its
    sequences within the context of every model it loads (the configs as the hub serves them, from CONTEXT)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    real = cli.model_config
    monkeypatch.setattr(cli, "model_config", lambda name, field: real(name, field) if name.startswith("tiny:") else
                        type("C", (), {"max_position_embeddings": CONTEXT[name]})())
    mod = importlib.import_module(script)
    for name in mod.PRESETS:
        args = cli.parse_args(mod.Args, mod.PRESETS, ["--preset", name])
        cli.validate_args(args, getattr(mod, "check_args", None), getattr(mod, "model_fields", None),
                              () if script in ("copd", "sparse_to_dense") else cli.PER_STEP)
        if script == "copd":
            mod.plan(args, cli.world_size())


def _exit_line(capsys, mod, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(mod.Args, mod.PRESETS, ["--preset", "tiny", *argv])
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


def test_zero_where_it_means_something(capsys, monkeypatch, tmp_path):
    """0 is a valid value where --help gives it a meaning (never, all, keep every checkpoint, evaluate only); a
    negative one is not."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    import kdrl
    import sparse_to_dense as s2d
    a = cli.parse_args(kdrl.Args, kdrl.PRESETS, ["--preset", "tiny", "--total-steps", "0", "--eval-every", "0",
                                                     "--save-every", "0", "--eval-limit", "0", "--keep-checkpoints",
                                                     "0", "--log-samples", "0", "--lr-warmup-steps", "0"])
    assert (a.total_steps, a.keep_checkpoints) == (0, 0)
    assert "--save-every -1: must be at least 0" in _exit_line(capsys, kdrl, "--save-every", "-1")
    assert "--grader-workers 0: must be at least 1" in _exit_line(capsys, kdrl, "--grader-workers", "0")
    assert "--num-minibatches 0: must be at least 1" in _exit_line(capsys, kdrl, "--num-minibatches", "0")
    # a stage left out may have 0 steps
    assert cli.parse_args(s2d.Args, s2d.PRESETS, ["--preset", "tiny", "--stages", "2b,3", "--steps-1", "0"])
    # the model checks only the models the run loads: a local folder with a config is fine offline, one without is
    # one line, and so is an uncached explorer that plain GRPO (--t-mix 0) never loads
    import s2l_po
    from transformers import Qwen2Config
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "cannot be loaded" in _exit_line(capsys, kdrl, "--teacher", str(tmp_path))
    Qwen2Config(max_position_embeddings=4096).save_pretrained(tmp_path)
    cli.validate_args(cli.parse_args(kdrl.Args, kdrl.PRESETS, ["--preset", "tiny", "--teacher",
                                                                        str(tmp_path)]))
    args = cli.parse_args(s2l_po.Args, s2l_po.PRESETS, ["--preset", "tiny", "--t-mix", "0", "--explorer",
                                                            "nobody/not-cached"], models=s2l_po.model_fields)
    with pytest.raises(ValueError, match="--explorer 'nobody/not-cached': HF_HUB_OFFLINE=1"):
        args.t_mix = 2
        cli.validate_args(args, models=s2l_po.model_fields)


def test_unknown_preset_is_one_line(capsys):
    import kdrl
    line = _exit_line(capsys, kdrl, "--preset", "nope")
    assert "unknown --preset 'nope'" in line and "\n" not in line


def test_a_model_that_cannot_be_reached_is_one_line(tmp_path):
    """`python kdrl.py` on a machine without network and without HF_HUB_OFFLINE (here: a hub endpoint that refuses
    connections): after the hub library's own retries, one line naming the model, its flag and the ways out, exit 2,
    no traceback, nothing written."""
    p = run_script("kdrl.py", "--output-dir", str(tmp_path / "run"), check=False, timeout=300,
                   env=dict(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf")))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("kdrl.py: error: --model 'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B' cannot be loaded ("), last
    assert all(w in last for w in ("local model folder", "HF_HOME", "HF_HUB_OFFLINE=1", "--preset tiny")), last
    assert len([line for line in p.stderr.splitlines() if "error" in line.lower()]) <= 2, p.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_dataset_or_benchmark_that_cannot_be_loaded_is_one_line(monkeypatch):
    """A hub dataset or benchmark unreachable (offline here) stops with one line naming it and the ways out."""
    import common
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=r"could not load dataset 'nobody/none' .*Use a local \.jsonl file, point "
                                         r"HF_HOME .*--preset tiny"):
        common.load_problems("nobody/none")
    with pytest.raises(SystemExit, match=r"could not load dataset 'HuggingFaceH4/MATH-500' .*Use --eval-data-dir DIR "
                                         r"with math500\.jsonl in it"):
        common.load_benchmarks("math500")


def test_teacher_with_another_chat_template_is_refused_unless_accepted():
    """Same vocabulary, another chat template: refused where the prompts go through the template, naming the flag that
    accepts it; accepted with that flag, and where prompts are raw text (no template)."""
    import runtime
    import tiny
    a, b = tiny.build_tokenizer(), tiny.build_tokenizer()
    runtime.check_same_tokenizer(a, b, "--model", "--teacher")
    b.chat_template = b.chat_template.replace("<|im_start|>assistant", "<|im_start|>assistant\n<think>")
    with pytest.raises(ValueError, match="--model and --teacher have different chat templates.*--allow-template-mismatch"):
        runtime.check_same_tokenizer(a, b, "--model", "--teacher")
    runtime.check_same_tokenizer(a, b, "--model", "--teacher", allow_template_mismatch=True)
    runtime.check_same_tokenizer(a, b, "--model", "--large-model", chat=False)
