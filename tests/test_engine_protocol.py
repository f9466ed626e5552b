"""Every script keeps the rollout engine's protocol that vLLM needs: the engine sleeps between sampling and the
update (a level-2 sleep discards its weights), and the trained weights are pushed before it samples again.

The HF engine keeps its weights through sleep(), so a script that forgot a push would still pass all of its HF
tests and then fail (or sample from garbage) on GPUs. Here each script runs in-process with an engine that
forgets its weights on sleep, as vLLM's level-2 sleep does, and refuses to sample without them."""

import importlib

import pytest
import torch

import cli
import engines
import runtime


class ForgetfulEngine:
    """An HF engine with vLLM's level-2 sleep semantics: sleep() drops the weights (here: zeroes the replica's
    parameters, so a missed push could never pass silently), generate() refuses to run without a push."""

    def __init__(self, inner):
        self.inner, self.has_weights, self.pushes, self.sleeps, self.generates = inner, False, 0, 0, 0
        self.holds = None

    def load_weights(self, named_tensors) -> None:
        self.inner.load_weights(named_tensors)
        self.has_weights, self.pushes = True, self.pushes + 1

    def sleep(self) -> None:
        with torch.no_grad():
            for p in self.inner.model.parameters():
                p.zero_()
        self.has_weights, self.sleeps, self.holds = False, self.sleeps + 1, None

    def generate(self, *args, **kwargs):
        if not self.has_weights:
            raise AssertionError("generate() after sleep() without a weight push: vLLM would have no weights")
        self.generates += 1
        return self.inner.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


QUICK = ("--preset", "tiny", "--eval-limit", "8", "--eval-samples", "1", "--prompts-per-step", "4", "--group-size",
         "4", "--save-every", "0")
CASES = {
    "kdrl": ("--total-steps", "3", "--eval-every", "1"),
    "codistill_grpo": ("--total-steps", "3", "--eval-every", "1", "--large-rollout-frac", "0.5"),
    "s2l_po": ("--total-steps", "3", "--t-mix", "2", "--eval-every", "1", "--bank-samples", "4"),
    "copd": ("--total-steps", "4", "--s-rl", "1", "--s-opd", "1", "--diag-prompts", "4"),
    "sparse_to_dense": ("--steps-1", "1", "--steps-2a", "1", "--steps-2b", "2", "--steps-3", "2", "--eval-every", "1",
                        "--distill-prompts-per-step", "4"),
}


def test_forgetful_engine_catches_a_missing_push(warm):
    d = runtime.Dist(0, 1, 0, torch.device("cpu"))
    tok = runtime.load_tokenizer(warm["small"])
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(warm["small"])
    eng = ForgetfulEngine(engines.HFEngine.replica(warm["small"], d, runtime.eos_ids(tok, warm["small"]), tok.pad_token_id,
                                           len(tok), 8))
    s = engines.Sampling(4, 1.0, 1.0, -1)  # -1: no top-k, as vLLM spells it
    with pytest.raises(AssertionError, match="without a weight push"):
        eng.generate([[1, 2, 3]], 1, s, seed=0)  # never pushed
    eng.load_weights(model.named_parameters())
    eng.generate([[1, 2, 3]], 1, s, seed=0)
    eng.sleep()
    assert all((p == 0).all() for p in eng.inner.model.parameters())
    with pytest.raises(AssertionError, match="without a weight push"):
        eng.generate([[1, 2, 3]], 1, s, seed=0)


@pytest.mark.parametrize("script", list(CASES))
def test_script_pushes_weights_after_every_sleep(script, tmp_path, warm, monkeypatch):
    made = []
    make = engines.make_engine

    def forgetful(*args, **kwargs):
        made.append(ForgetfulEngine(make(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(engines, "make_engine", forgetful)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "0")  # registers the variable with monkeypatch, which restores it afterwards
        monkeypatch.delenv(k)       # init_distributed then runs as a world of one, as under plain `python`
    extra = ("--bank-dir", str(tmp_path / "banks")) if script == "s2l_po" else ()
    mod = importlib.import_module(script)
    argv = [*QUICK, *CASES[script], *extra, "--output-dir", str(tmp_path / "run")]
    mod.main(cli.parse_args(mod.Args, mod.PRESETS, argv))
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    # the protocol was exercised: the training engine slept between sampling and updates, and sampled again after
    train = max(made, key=lambda e: e.sleeps)
    assert train.sleeps >= 2 and train.generates >= train.sleeps, (train.sleeps, train.generates)
