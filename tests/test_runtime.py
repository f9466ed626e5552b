"""runtime.py: the HF rollout engine against transformers' generate, sampling filters against a loop reference,
argument presets, and checkpoint/FSDP2 plumbing under a 2-rank torchrun."""

import json
import math
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import cli
import common
import engines
import runtime
from conftest import ROOT, run_script
from test_math import _tiny_model


def _engine(model, vocab, stop=(1,), batch_size=4):
    return engines.HFEngine(model, list(stop), 0, vocab, batch_size)


def test_greedy_sampling_matches_transformers_generate():
    """Left-padded prompts of different lengths, KV cache, per-row positions: the same tokens as HF generate."""
    model = _tiny_model(vocab=40)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    outs = _engine(model, vocab=40).generate(prompts, 1, engines.Sampling(12, temperature=0.0), seed=0)
    for p, (c,) in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=0)[0, len(p):].tolist()
        if 1 in ref:
            ref = ref[:ref.index(1) + 1]
        assert c.token_ids == ref
        assert c.finished == (ref[-1] == 1)


def test_sampled_logprobs_equal_trainer_logprobs_and_seed_reproduces():
    """The engine's processed log-probs equal the trainer's recomputation (fp32, T=0.8); the same seed gives the
    same rollouts; the padded vocabulary (ids >= 36 of 40) is never sampled."""
    model = _tiny_model(vocab=40)
    with torch.no_grad():
        model.lm_head.weight[36:] += 5.0  # make the padding ids attractive: they must still never appear
    eng = _engine(model, vocab=36, stop=(1,))
    prompts = [[5, 6, 7], [8, 9]]
    s = engines.Sampling(10, temperature=0.8)
    a = eng.generate(prompts, 3, s, seed=123)
    b = eng.generate(prompts, 3, s, seed=123)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    flat = [c for g in a for c in g]
    assert all(t < 36 for c in flat for t in c.token_ids)
    prompt_B = [p for p in prompts for _ in range(3)]
    batch = common.Batch.of(prompt_B, [c.token_ids for c in flat], 0, "cpu")
    logp, _ = common.token_logprobs(model, batch, vocab=36, temperature=0.8)
    eng_logp = common.response_grid(prompt_B, [c.logprobs for c in flat], batch.T, "cpu")
    assert (logp - eng_logp).abs().max() < 1e-4


def _filter_ref(row, top_k, top_p):
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep = set(order[:top_k] if top_k > 0 else order)  # 0 and -1 both mean no top-k
    probs = [math.exp(row[i]) for i in order if i in keep]
    z, cum, kept = sum(probs), 0.0, set()
    for i in [i for i in order if i in keep]:
        if cum >= top_p:
            break
        kept.add(i)
        cum += math.exp(row[i]) / z
    return kept


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (3, 1.0), (4, 0.7), (0, 1.0), (1, 0.9), (-1, 1.0), (-1, 0.6)])
def test_filter_logits_matches_loop(top_k, top_p):
    logits = torch.randn(6, 10)
    out = engines.filter_logits(logits.clone(), top_k, top_p)
    for b in range(6):
        kept = {i for i in range(10) if out[b, i] > float("-inf")}
        assert kept == _filter_ref(logits[b].tolist(), top_k, top_p)


@dataclass
class _A:
    preset: str = cli.arg("paper", "p")
    lr: float = cli.arg(1.0, "lr")
    steps: int = cli.arg(5, "s")
    flag: bool = cli.arg(False, "f")


def test_presets_apply_and_explicit_flags_win():
    presets = {"paper": {}, "tiny": {"lr": 0.5, "steps": 2, "flag": True}}
    assert cli.parse_args(_A, presets, []).lr == 1.0
    a = cli.parse_args(_A, presets, ["--preset", "tiny", "--steps", "7"])
    assert (a.lr, a.steps, a.flag) == (0.5, 7, True)
    assert cli.parse_args(_A, presets, ["--preset", "tiny", "--flag", "false"]).flag is False
    with pytest.raises(SystemExit):
        cli.parse_args(_A, presets, ["--preset", "nope"])


def test_fsdp2_two_ranks_match_one_process_and_checkpoint_roundtrips(tmp_path):
    """Under torchrun with 2 gloo ranks: gradients through the chunked LM head of an FSDP2 model equal the
    unsharded ones, weight sync reaches the engine, and a DCP checkpoint saved on 2 ranks reloads on 1 rank."""
    run_script("tests/fsdp_check.py", str(tmp_path), nproc=2, timeout=300)
    run_script("tests/fsdp_check.py", str(tmp_path), "--reload", timeout=300)


class _FakeLLM:
    """Records the calls the vLLM engine makes, with vLLM 0.32.0's output shapes (RequestOutput/CompletionOutput,
    logprobs as one {token_id: Logprob} dict per position)."""

    def __init__(self, rows=16, **kw):
        self.calls, self.weights, self.kw = [], {}, kw
        runner = type("R", (), {"get_model": lambda _: type("M", (), {"load_weights": self._load})()})()
        worker = type("W", (), {"model_runner": runner})()
        config = type("C", (), {"get_vocab_size": lambda _: rows})()
        self.llm_engine = type("E", (), {"model_executor": type("X", (), {"driver_worker": worker})(),
                                         "model_config": config})()

    def _load(self, weights):
        for name, t in weights:
            self.weights[name] = t
        self.calls.append("load")

    def wake_up(self, tags=None):
        self.calls.append(f"wake:{','.join(tags)}")

    def sleep(self, level=1):
        self.calls.append(f"sleep:{level}")

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def generate(self, prompts, sp, use_tqdm=False):
        self.calls.append("generate")
        self.sampling = sp

        def out(p):
            toks = [p["prompt_token_ids"][0] + 1, 2]
            logprobs = [{t: type("L", (), {"logprob": -0.5 * (i + 1)})()} for i, t in enumerate(toks)]
            comp = type("C", (), {"token_ids": toks, "logprobs": logprobs, "finish_reason": "stop"})()
            return type("O", (), {"outputs": [comp] * sp.n})()
        return [out(p) for p in prompts]


def _fake_vllm(monkeypatch, rows: int):
    """vLLM replaced by _FakeLLM (the engine's own code runs; only vLLM is recorded), as on a CUDA rank."""
    fake = type(sys)("vllm")
    fake.__version__, fake.LLM = engines.VLLM_VERSION, lambda **kw: _FakeLLM(rows, **kw)
    fake.SamplingParams = lambda **kw: type("S", (), kw)()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    d = runtime.Dist(0, 1, 0, torch.device("cuda", 0))
    return engines.VLLMEngine("m", d, [2], vocab=12, seed=0, max_model_len=64, gpu_memory_utilization=0.3,
                              sleep_level=2, kv_cache_gib=0)


def test_vllm_engine_wakes_pushes_and_sleeps_in_order(monkeypatch):
    """The colocated engine's GPU life cycle (sleep mode), without a GPU: it starts asleep (its construction frees the
    memory it took), weights are woken and pushed in one streamed call before any generation (never reloaded from
    disk), the KV cache wakes for generation, sleep frees both, generating asleep is an error, and every request
    masks the padded vocabulary by a logit bias. The CPU path runs the real engine in tests/test_vllm.py."""
    eng = _fake_vllm(monkeypatch, rows=16)
    assert eng.llm.kw["enable_sleep_mode"] and eng.llm.kw["dtype"] == "bfloat16" and eng.dtype == torch.bfloat16
    assert eng.llm.calls == ["sleep:2"]  # asleep from the start: the first push wakes it
    with pytest.raises(RuntimeError, match="push weights"):
        eng.generate([[5]], 1, engines.Sampling(4), seed=0)
    eng.load_weights(iter([("a", torch.ones(1)), ("b", torch.zeros(1))]))
    out = eng.generate([[5], [7]], 2, engines.Sampling(4), seed=3)
    eng.generate([[5]], 1, engines.Sampling(4), seed=4)
    eng.sleep()
    assert eng.llm.calls == ["sleep:2", "wake:weights", "load", "reset", "wake:kv_cache", "generate", "generate",
                             "sleep:2"]
    assert set(eng.llm.weights) == {"a", "b"}
    assert [c.token_ids for c in out[1]] == [[8, 2], [8, 2]] and out[0][0].logprobs == [-0.5, -1.0]
    assert out[0][0].finished and eng.llm.sampling.logit_bias == dict.fromkeys(range(12, 16), float("-inf"))
    assert not hasattr(eng.llm.sampling, "allowed_token_ids")  # capped at 1,024 ids per request on CUDA
    with pytest.raises(RuntimeError, match="push weights"):
        eng.generate([[5]], 1, engines.Sampling(4), seed=0)


def test_padding_bias_within_vllms_per_request_cap(monkeypatch):
    """No bias without padding; a padding longer than the GPU sampler's cap is refused at start-up, naming the way out."""
    assert engines.padding_bias(320, 320) is None
    assert engines.padding_bias(151_665, 151_936) == dict.fromkeys(range(151_665, 151_936), float("-inf"))
    cap = pytest.importorskip("vllm.v1.worker.gpu.sample.logit_bias").MAX_NUM_LOGIT_BIAS_TOKENS
    with pytest.raises(ValueError, match="--rollout hf"):
        engines.padding_bias(1000, 1001 + cap)


def test_update_on_two_fsdp_ranks_equals_one_model_on_the_whole_batch(tmp_path):
    """The claim (docs/running.md) that N ranks compute the update one process would with the whole batch: two gloo ranks
    with unequal response lengths (2.5x more tokens on rank 1), FSDP2, two optimizer steps of the shared skeleton
    with a binding clip and AdamW, against one unsharded model, for all three loss aggregations."""
    run_script("tests/fsdp_update_check.py", str(tmp_path), nproc=2, timeout=300)
    res = json.loads((tmp_path / "update_check.json").read_text())
    assert set(res) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}
    for agg, r in res.items():
        assert r["grad_norms"] == pytest.approx(r["ref_grad_norms"], rel=1e-5), agg
        assert all(n > 0.5 for n in r["grad_norms"][:1]), agg  # the clip at 0.5 binds
        assert r["max_grad_diff"] < 1e-6 * max(r["max_grad"], 1.0), (agg, r)
        assert r["max_weight_diff"] < 1e-3 * r["max_weight_change"], (agg, r)  # fp32 reduction order only


def test_minibatches_are_exactly_the_requested_optimizer_steps():
    batch = common.Batch.of([[1, 2]] * 12, [[3, 4, 5]] * 12, 0, "cpu")
    assert [len(u) for u in runtime.minibatches(batch, 1, 4)] == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="--num-minibatches 8 does not divide this rank's 12 micro-batches"):
        runtime.minibatches(batch, 1, 8)  # before: silently 6 optimizer steps of 2


def test_meter_reduces_like_per_item_python_sums():
    """The meter's one-sync readout equals the float64 Python sums it replaced, to the last bit."""
    torch.manual_seed(0)
    xs = [torch.randn(3, 5) for _ in range(4)]
    m = runtime.Meter()
    ref_sum, ref_add, ref_max = 0.0, 0.0, 0.0
    for x in xs:
        m.tokens({"a": x})
        m.add({"b": x.mean()}, divide_by=3)
        m.max({"c/max": x})
        ref_sum += x.sum().item()
        ref_add += x.mean().item() / 3
        ref_max = max(ref_max, x.max().item())
    with m.time("t"):
        pass
    out = m.read(torch.tensor(17.0))
    assert out["a"] == ref_sum / 17.0 and out["b"] == ref_add and out["c/max"] == ref_max
    assert set(out) == {"a", "b", "c/max", "timing_s/t", "timing_s/step"}


def test_optimizer_step_skips_a_non_finite_gradient():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    meter = runtime.Meter(clock=False)
    runtime.optimizer_step(model, opt, 1.0, meter)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # the weights never saw the NaN
    assert all(p.grad is None for p in model.parameters()) and not opt.state   # nor did AdamW's moments
    assert meter.read() == {"policy/nonfinite_skips": 1.0}                     # counted; no NaN grad norm logged
    model(torch.ones(1, 3)).sum().backward()
    runtime.optimizer_step(model, opt, 1.0, meter)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_run_whose_loss_turns_nan_skips_its_steps_then_stops_with_a_message(tmp_path, warm):
    """kdrl.py with the loss made NaN from step 2 on: steps 2-4 are skipped and counted, the run stops at step 4
    naming the last checkpoint, and that checkpoint holds the good step-1 weights."""
    shim = ("import runpy, sys, common\n"
            "agg, calls = common.agg_loss, [0]\n"
            "def nan_after_step_1(*a, **k):\n"
            "    calls[0] += 1\n"
            "    out = agg(*a, **k)\n"
            "    return out * float('nan') if calls[0] > 2 else out\n"  # two agg_loss calls per step: pg and kd
            "common.agg_loss = nan_after_step_1\n"
            "sys.argv = ['kdrl.py', *sys.argv[1:]]\n"
            "runpy.run_path('kdrl.py', run_name='__main__')\n")
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--total-steps", "8", "--eval-every", "0", "--eval-limit", "4", "--eval-samples", "1",
            "--prompts-per-step", "4", "--group-size", "4", "--save-every", "1", "--keep-checkpoints", "5",
            "--output-dir", str(out)]
    proc = subprocess.run([sys.executable, "-c", shim, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "stopping at step 4: 3 steps in a row had a non-finite loss or gradient norm" in proc.stderr, proc.stderr[-3000:]
    assert "Last checkpoint: " in proc.stderr and "step_3" in proc.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["policy/nonfinite_skips"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert "policy/grad_norm" in rows[0] and all("policy/grad_norm" not in r for r in rows[1:])
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    for s in (1, 3):
        dcp_to_torch_save(out / "checkpoints" / f"step_{s}", tmp_path / f"s{s}.pt")
    w1, w3 = (torch.load(tmp_path / f"s{s}.pt", weights_only=True)["model.student"] for s in (1, 3))
    assert w1 and all(torch.equal(w1[k], w3[k]) for k in w1)  # the skipped steps left the weights as they were


@dataclass
class _Sampling:
    top_p: float = 1.0
    top_k: int = 0
    temperature: float = 1.0


def test_stale_engine_guard_warns_then_stops(tmp_path, monkeypatch, capsys):
    """RunLog's guard against rollouts from stale weights: a gap within the engine dtype's limit (plus top-p's bound)
    passes; one above it warns on every step, and STALE_LIMIT steps in a row stop the run; a good step resets the
    count; no engine, top-k or greedy sampling (no bound on the gap) disable it."""
    d = runtime.Dist(0, 1, 0, torch.device("cpu"))
    monkeypatch.setattr(runtime, "ENGINES", [type("E", (), {"dtype": torch.float32})()])
    args = _Sampling(top_p=0.95)
    assert runtime.logp_gap_limit(args) == pytest.approx(1e-3 - math.log(0.95))
    log = runtime.RunLog(tmp_path, d, args, 0, 10)
    ok, bad = 1e-3 - math.log(0.95) - 1e-6, 0.06
    log.metrics(1, {"sampling/logp_diff_mean": ok})
    log.metrics(2, {"sampling/logp_diff_mean": bad})
    log.metrics(3, {"branch1/logp_diff_mean": bad, "sampling/logp_diff_mean": ok})
    log.metrics(4, {"sampling/logp_diff_mean": ok})  # resets
    log.metrics(5, {"sampling/logp_diff_mean": bad})
    log.metrics(6, {"sampling/logp_diff_mean": bad})
    with pytest.raises(SystemExit, match="stopping at step 7: for 3 steps in a row .* a weight push that did nothing"):
        log.metrics(7, {"sampling/logp_diff_mean": bad})
    out = capsys.readouterr().out
    assert "[step 1]" not in out and "[step 2] warning" in out and "branch1/logp_diff_mean 0.06" in out
    for top_k, temperature, engines_ in ((20, 1.0, runtime.ENGINES), (0, 0.0, runtime.ENGINES), (0, 1.0, [])):
        monkeypatch.setattr(runtime, "ENGINES", engines_)
        assert runtime.logp_gap_limit(_Sampling(top_k=top_k, temperature=temperature)) is None
