"""The GPU check: one prepared script for any GPU box (about 8 minutes on one GPU), every figure in one JSON file.

    python bench/gpu_check.py                              # CUDA, all sections; JSON to bench/out/gpu_check.json
    python bench/gpu_check.py --out $OUT/gpu_check.json    # a lent machine: the JSON comes back with $OUT
    python bench/gpu_check.py --device cpu --smoke         # toy shapes on the CPU, about two minutes (CI runs it)

Sections (each one key of the JSON, each with `ok`; the script exits 1 if any check failed):
  scripts   every script's tiny preset as a user runs it (`python <script> --preset tiny`, which on CUDA is NCCL,
            FSDP2 with bf16 compute and fp32 master weights, activation checkpointing), `--rollout hf` always and
            `--rollout vllm` where vLLM imports: exit 0, finite metrics, every output written, and the engine/trainer
            log-prob gap of the sampled tokens (`*logp_diff_mean`) within the engine dtype's limit
            (runtime.LOGP_GAP_LIMIT) after every push.
  wide      the Qwen-vocabulary toy model (tiny:wide: 151,665 tokens, 151,936 tied rows) through both engines:
            kdrl.py for two steps (chunked log-probs and full-vocabulary KL at V = 151,936, the tied push, the
            padded-vocabulary mask) with the same checks.
  numerics  bf16 against fp32 on a real-shaped random-init pair (a Qwen2.5-0.5B-shaped student, a 1.5B-shaped
            teacher, from config): the sampled tokens' log-probs, the k2 and full-vocabulary KL terms and the KDRL
            loss, computed by the trainer's own functions, within the tolerances in NUMERICS.
  perf      one KDRL update of that pair (student forward/backward with the chunked head, teacher forward, AdamW)
            on 8 x 512 response tokens: tokens/s and MFU (6·N·tokens / time over a bf16 matmul peak measured in the
            same run; N counts the student's parameters, the tied head once), the teacher's forward tokens/s, the
            rollout tokens/s of each engine, peak memory per phase.
  chunked   the chunked log-prob and KL against a plain `log_softmax` at V = 151,936 over 4,096 tokens: largest
            differences and peak memory of each.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# bf16 against fp32 (random init, real shapes): what the check accepts, chosen well above the bf16 rounding of a
# 0.5-1.5B forward and well below what a wrong dtype path (a head in bf16 logits sliced wrong, a cast on the wrong
# side of a log-softmax) gives: mean |Δ log p| of the sampled tokens, and relative errors of the per-token means of
# the KL terms, of the loss and of its gradient's norm.
NUMERICS = {"logp_mean_abs": 0.05, "k2_rel": 0.05, "full_kl_rel": 0.05, "loss_rel": 0.05, "grad_norm_rel": 0.05}
QUICK = ("--preset", "tiny", "--eval-limit", "8", "--eval-samples", "2", "--prompts-per-step", "4", "--group-size",
         "4", "--save-every", "0", "--vllm-kv-cache-gib", "0.25")
RUNS = {  # (script, flags after QUICK); sparse_to_dense and s2l_po under vLLM run as two invocations (docstrings)
    "kdrl": [("kdrl.py", ("--total-steps", "2", "--eval-every", "2"))],
    "codistill_grpo": [("codistill_grpo.py", ("--total-steps", "2", "--eval-every", "2", "--large-rollout-frac",
                                              "0.5"))],
    "s2l_po": [("s2l_po.py", ("--total-steps", "2", "--t-mix", "2", "--eval-every", "2", "--bank-samples", "4",
                              "--bank-only")),
               ("s2l_po.py", ("--total-steps", "2", "--t-mix", "2", "--eval-every", "2", "--bank-samples", "4"))],
    "copd": [("copd.py", ("--total-steps", "2", "--s-rl", "1", "--s-opd", "1", "--diag-prompts", "4"))],
    "sparse_to_dense": [("sparse_to_dense.py", ("--stages", "1,2a", "--steps-1", "1", "--steps-2a", "1",
                                                "--eval-every", "1", "--distill-prompts-per-step", "4")),
                        ("sparse_to_dense.py", ("--stages", "2b,3", "--steps-2b", "1", "--steps-3", "1", "--eval-every",
                                                "1", "--distill-prompts-per-step", "4", "--teacher", "{0}/stage_1",
                                                "--model", "{0}/stage_2a"))],
}
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # a run's own
OUTPUTS = ("config.json", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "curves.png", "final/config.json")


def vllm_importable() -> bool:
    p = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True)
    return p.returncode == 0


# ----------------------------------------------------------------------------------------------------------
# scripts and wide: the scripts as a user runs them
# ----------------------------------------------------------------------------------------------------------
def run_script(name: str, engine: str, root: Path, extra: tuple = ()) -> dict:
    """One script's runs (one, or two invocations chained by their folders), checked: exit code, outputs, finite
    metrics, the engine/trainer gap after every push."""
    import runtime
    t0, out, res = time.perf_counter(), root / f"{name}-{engine}", {"engine": engine}
    for i, (script, flags) in enumerate(RUNS[name]):
        if "--bank-only" in flags and engine == "hf":
            continue  # the HF engine builds the bank inside the training run
        run = out if i == len(RUNS[name]) - 1 else out.with_name(out.name + f"-part{i}")
        flags = tuple(f.format(out.with_name(out.name + "-part0")) for f in flags)
        cmd = [sys.executable, str(ROOT / script), *QUICK, *flags, "--rollout", engine, *extra, "--output-dir",
               str(run), "--overwrite"]
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV} | {"HF_HUB_OFFLINE": "1"}
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if p.returncode:
            return res | {"ok": False, "error": (p.stderr or p.stdout)[-3000:], "command": " ".join(cmd[1:])}
        if "--bank-only" in flags:
            continue
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        nums = [v for r in rows for v in r.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        gaps = [v for r in rows for k, v in r.items() if k.endswith("logp_diff_mean")]
        missing = [o for o in OUTPUTS if not (run / o).exists()]
        limit = runtime.LOGP_GAP_LIMIT[torch.bfloat16 if torch.cuda.is_available() else torch.float32]
        res |= {"steps": len(rows), "missing_outputs": missing, "finite": all(map(math.isfinite, nums)),
                "logp_diff_max": max(gaps, default=None), "logp_gap_limit": limit}
        res["ok"] = bool(rows) and not missing and res["finite"] and bool(gaps) and max(gaps) <= limit
        if not res["ok"]:
            break
    return res | {"wall_s": round(time.perf_counter() - t0, 1)}


def section_scripts(root: Path, engines_: list[str], jobs: int) -> dict:
    work = [(name, e) for e in engines_ for name in RUNS]
    with ThreadPoolExecutor(jobs) as ex:
        done = list(ex.map(lambda w: run_script(w[0], w[1], root), work))
    res = {f"{name}/{e}": r for (name, e), r in zip(work, done)}
    return res | {"ok": all(r["ok"] for r in done)}


def section_wide(root: Path, engines_: list[str], jobs: int, smoke: bool) -> dict:
    wide = ("--model", "tiny:wide", "--teacher", "tiny:wide", "--logprob-chunk", "256", "--kd-estimator", "full")
    if smoke:  # one step of two groups of two: every code path at V = 151,936, a CPU's minute
        wide += ("--total-steps", "1", "--eval-every", "0", "--prompts-per-step", "2", "--group-size", "2",
                 "--eval-limit", "2", "--max-new-tokens", "24", "--eval-max-new-tokens", "24")
    with ThreadPoolExecutor(jobs) as ex:
        done = list(ex.map(lambda e: run_script("kdrl", e, root / "wide", wide), engines_))
    res = {f"kdrl/{e}": r for e, r in zip(engines_, done)}
    return res | {"ok": all(r["ok"] for r in done)}


# ----------------------------------------------------------------------------------------------------------
# numerics, perf and chunked: a real-shaped random-init pair, through the trainer's own functions
# ----------------------------------------------------------------------------------------------------------
SHAPES = {  # Qwen2.5-0.5B and -1.5B (tied, V = 151,936); smoke: the same vocabulary behind toy bodies
    "student": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864),
    "teacher": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                    intermediate_size=8960),
}
SMOKE_SHAPES = {"student": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                intermediate_size=128),
                "teacher": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                                intermediate_size=192)}


def build_pair(folder: Path, smoke: bool) -> dict[str, Path]:
    """Random-init Qwen2 models from config, saved as HF folders with tiny:wide's tokenizer (151,665 tokens)."""
    import tiny
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    tok = AutoTokenizer.from_pretrained(tiny.warm_start("wide"))
    paths = {}
    for role, shape in (SMOKE_SHAPES if smoke else SHAPES).items():
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=4096,
                          rope_theta=1e6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=None, **shape)
        paths[role] = folder / role
        Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(paths[role])
        tok.save_pretrained(paths[role])
    return paths


def fake_batch(n: int, prompt: int, response: int, vocab: int, device):
    import common
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, prompt + response), generator=g)
    return common.Batch.of([r[:prompt].tolist() for r in ids], [r[prompt:].tolist() for r in ids], 0, device)


def kdrl_terms(student, teacher, batch, vocab: int, chunk: int) -> dict:
    """The KDRL quantities of one batch (Eq. 8: PPO surrogate + β·k2, and the exact reverse KL), by common's functions."""
    import common
    h_NH = common.response_hidden(student, batch)
    logp_N, _ = common.logprobs_from_hidden(h_NH, student.get_output_embeddings(), common.response_targets(batch),
                                            vocab, 1.0, chunk)
    with torch.no_grad():
        h_t_NH = common.response_hidden(teacher, batch)
        t_logp_N, _ = common.logprobs_from_hidden(h_t_NH, teacher.get_output_embeddings(),
                                                  common.response_targets(batch), vocab, 1.0, chunk)
    full_kl_N = common.kl_from_hidden(h_NH, student.get_output_embeddings(), h_t_NH, teacher.get_output_embeddings(),
                                      vocab, "reverse", chunk)
    logp_BT, t_logp_BT = common.to_grid(logp_N, batch), common.to_grid(t_logp_N, batch)
    adv_BT = torch.linspace(-1, 1, logp_BT.shape[0], device=logp_BT.device)[:, None].expand_as(logp_BT)
    pg_BT, _, _ = common.ppo_clip_loss(logp_BT, logp_BT.detach(), adv_BT, 0.2, 0.2)
    norm = common.LossNorm.of([batch.mask_BT], batch.T)
    # β = 1 so that the KL term carries the loss's value (on-policy the surrogate's value is −mean A, whatever the
    # numerics); its gradient is compared too
    loss = common.agg_loss(pg_BT + common.kl_estimate(logp_BT, t_logp_BT, "k2"), batch.mask_BT, "token-mean", norm)
    return {"logp_N": logp_N, "k2_N": 0.5 * (logp_N - t_logp_N) ** 2, "full_kl_N": full_kl_N, "loss": loss}


def grad_norm(model) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def models(paths: dict, d, bf16: bool):
    """(student, teacher): the trainer's own models on CUDA (runtime.load_model: FSDP2, bf16 compute, fp32 masters;
    a bf16 frozen teacher) when `bf16`, else plain fp32 HF models; on a CPU, bf16 is a cast copy at toy size."""
    import runtime
    from transformers import AutoModelForCausalLM
    if bf16 and d.device.type == "cuda":
        return (runtime.load_model(str(paths["student"]), d, trainable=True, vocab=151_665, grad_ckpt=True),
                runtime.load_model(str(paths["teacher"]), d, trainable=False, vocab=151_665))
    dtype = torch.bfloat16 if bf16 else torch.float32
    return tuple(AutoModelForCausalLM.from_pretrained(paths[r], dtype=dtype).to(d.device) for r in ("student", "teacher"))


def section_numerics(paths: dict, d, smoke: bool) -> dict:
    batch = fake_batch(2 if smoke else 4, 16, 48 if smoke else 512, 151_665, d.device)
    out = {}
    for bf16 in (False, True):
        s, t = models(paths, d, bf16)
        terms = kdrl_terms(s, t, batch, 151_665, 1024)
        terms["loss"].backward()
        out[bf16] = {k: v.detach().double() for k, v in terms.items()} | {"grad_norm": grad_norm(s).double()}
        del s, t, terms
    a, b = out[False], out[True]
    rel = lambda k: float((b[k].mean() - a[k].mean()).abs() / a[k].mean().abs().clamp(min=1e-12))  # noqa: E731
    res = {"logp_mean_abs": float((b["logp_N"] - a["logp_N"]).abs().mean()),
           "logp_max_abs": float((b["logp_N"] - a["logp_N"]).abs().max()),
           "k2_rel": rel("k2_N"), "full_kl_rel": rel("full_kl_N"), "loss_rel": rel("loss"),
           "grad_norm_rel": rel("grad_norm"),
           "fp32_means": {k: float(v.mean()) for k, v in a.items()}, "tolerances": NUMERICS}
    return res | {"ok": all(res[k] <= tol for k, tol in NUMERICS.items())}


def sync(d) -> None:
    if d.device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(d) -> None:
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(d) -> float:
    """Peak GPU memory allocated since the last reset; on a CPU the process's peak resident memory."""
    if d.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, d, reps: int) -> float:
    """Median seconds of `fn` over `reps` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        sync(d)
        t0 = time.perf_counter()
        fn()
        sync(d)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def section_perf(paths: dict, d, smoke: bool) -> dict:
    import engines
    import runtime
    n_mm = 1024 if smoke else 8192
    x = torch.randn(n_mm, n_mm, device=d.device, dtype=torch.bfloat16 if d.device.type == "cuda" else torch.float32)
    peak = 2 * n_mm**3 / timed(lambda: x @ x, d, 3 if smoke else 10)
    student, teacher = models(paths, d, bf16=True)
    n_params = sum(p.numel() for p in student.parameters())  # a tied head is counted once
    n_teacher = sum(p.numel() for p in teacher.parameters())
    B, R = (2, 32) if smoke else (8, 512)
    batch = fake_batch(B, 64, R, 151_665, d.device)
    tokens = int(batch.mask_BT.sum())
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    res = {"matmul_peak_tflops": peak / 1e12, "student_params": n_params, "teacher_params": n_teacher,
           "response_tokens": tokens, "peak_gib": {}}

    def teacher_forward():
        with torch.no_grad():
            import common
            common.token_logprobs(teacher, batch, 151_665, chunk=1024)

    peak_reset(d)
    t_teacher = timed(teacher_forward, d, 1 if smoke else 3)
    res["peak_gib"]["teacher_forward"] = peak_gib(d)

    def update():
        terms = kdrl_terms(student, teacher, batch, 151_665, 1024)
        terms["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peak_reset(d)
    t_update = timed(update, d, 1 if smoke else 3)
    res["peak_gib"]["update"] = peak_gib(d)
    res |= {"update_s": t_update, "update_tokens_per_s": tokens / t_update,
            "teacher_forward_tokens_per_s": tokens / t_teacher,
            "mfu_student": 6 * n_params * tokens / t_update / peak,
            "mfu_with_teacher": (6 * n_params + 2 * n_teacher) * tokens / t_update / peak}
    opt = teacher = None  # freed before the rollout engines start
    # rollouts from the student: the HF engine (and vLLM where it imports), after a push of the trained weights
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(paths["student"])
    prompts = [batch.ids_BT[b, :64].tolist() for b in range(B)]
    s = engines.Sampling(max_new_tokens=16 if smoke else 256, temperature=1.0)
    hf = engines.HFEngine.replica(str(paths["student"]), d, [tok.eos_token_id], tok.pad_token_id, 151_665, 64)
    peak_reset(d)
    t0 = time.perf_counter()
    engines.sync_weights(student, hf)
    res["push_hf_s"] = time.perf_counter() - t0
    res["peak_gib"]["push_hf"] = peak_gib(d)
    res["rollout_tokens_per_s"] = {}
    for name, eng in [("hf", hf)] + ([("vllm", None)] if vllm_importable() and not smoke else []):
        if eng is None:
            del hf
            eng = engines.VLLMEngine(str(paths["student"]), d, [tok.eos_token_id], 151_665, 0, 64 + s.max_new_tokens,
                                     0.3, 2, 0.0)
            runtime.ENGINES.append(eng)
            t0 = time.perf_counter()
            engines.sync_weights(student, eng)
            res["push_vllm_s"] = time.perf_counter() - t0
        peak_reset(d)
        outs = eng.generate(prompts, 4, s, seed=0)  # warm-up
        sync(d)
        t0 = time.perf_counter()
        outs = eng.generate(prompts, 4, s, seed=1)
        sync(d)
        n = sum(len(c.token_ids) for g in outs for c in g)
        res["rollout_tokens_per_s"][name] = n / (time.perf_counter() - t0)
        res["peak_gib"][f"rollout_{name}"] = peak_gib(d)
    return res | {"ok": all(math.isfinite(v) for v in (res["update_s"], res["mfu_student"]))}


def section_chunked(d, smoke: bool) -> dict:
    """common's chunked head against a plain log_softmax over the whole [N, V] logits, at V = 151,936."""
    import common
    N, H, V, vocab = (256 if smoke else 4096), 64 if smoke else 896, 151_936, 151_665
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False).to(d.device)
    head_t = torch.nn.Linear(H, V, bias=False).to(d.device)
    h = torch.randn(N, H, generator=g).to(d.device).requires_grad_(True)
    h_t = torch.randn(N, H, generator=g).to(d.device)
    y = torch.randint(0, vocab, (N,), generator=g).to(d.device)
    res = {"tokens": N, "vocab": V}
    peak_reset(d)
    logp, _ = common.logprobs_from_hidden(h, head, y, vocab, 1.0, 1024)
    kl = common.kl_from_hidden(h, head, h_t, head_t, vocab, "reverse", 1024)
    (logp.sum() + kl.sum()).backward()
    grad, grad_w, h.grad, head.weight.grad = h.grad.clone(), head.weight.grad.clone(), None, None
    res["peak_gib_chunked"] = peak_gib(d)
    peak_reset(d)
    full = (h @ head.weight[:vocab].T).float().log_softmax(-1)
    full_t = (h_t @ head_t.weight[:vocab].T).float().log_softmax(-1)
    ref_logp, ref_kl = full.gather(1, y[:, None]).squeeze(1), (full.exp() * (full - full_t)).sum(-1)
    (ref_logp.sum() + ref_kl.sum()).backward()
    res["peak_gib_plain"] = peak_gib(d)
    logp, kl, ref_logp, ref_kl = logp.detach(), kl.detach(), ref_logp.detach(), ref_kl.detach()
    res |= {"logp_max_abs": float((logp - ref_logp).abs().max()), "kl_max_abs": float((kl - ref_kl).abs().max()),
            "grad_max_abs": float((grad - h.grad).abs().max()),
            "head_grad_max_abs": float((grad_w - head.weight.grad).abs().max())}
    return res | {"ok": all(res[k] < 1e-3 for k in ("logp_max_abs", "kl_max_abs", "grad_max_abs", "head_grad_max_abs"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--smoke", action="store_true", help="toy shapes and the fewest runs that reach every code path")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_check.json"))
    ap.add_argument("--sections", default="scripts,wide,numerics,perf,chunked")
    ap.add_argument("--jobs", type=int, default=2, help="script runs at once")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; use --device cpu --smoke for the toy-shape run")
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the scripts' subprocesses too
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import runtime
    sections = a.sections.split(",")
    with_vllm = vllm_importable()
    engines_ = ["hf", "vllm"] if with_vllm else ["hf"]
    res = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "smoke": a.smoke,
           "torch": torch.__version__, "vllm": with_vllm, "command": " ".join(sys.argv)}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "scripts" in sections:  # smoke: the HF engine for every script (tests/test_vllm.py covers vLLM's)
            res["scripts"] = section_scripts(root, ["hf"] if a.smoke else engines_, a.jobs)
        if "wide" in sections:
            res["wide"] = section_wide(root, engines_, a.jobs, a.smoke)
        d = runtime.init_distributed()  # after the scripts' runs: this process's GPU share and port are its own
        if {"numerics", "perf"} & set(sections):
            paths = build_pair(root / "pair", a.smoke)
            if "numerics" in sections:
                res["numerics"] = section_numerics(paths, d, a.smoke)
            if "perf" in sections:
                res["perf"] = section_perf(paths, d, a.smoke)
        if "chunked" in sections:
            res["chunked"] = section_chunked(d, a.smoke)
    res["wall_s"] = round(time.perf_counter() - t_all, 1)
    res["ok"] = all(res[s]["ok"] for s in sections)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    for s in sections:
        print(f"{s}: {'ok' if res[s]['ok'] else 'FAILED'}")
    print(f"gpu_check: {'ok' if res['ok'] else 'FAILED'} in {res['wall_s']} s; {a.out}")
    runtime.finish()
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
