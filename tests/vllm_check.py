"""Helper for tests/test_vllm.py, run as its own process: the real vLLM engine against the trainer's own numbers, on a
model with Qwen2.5's vocabulary shape (tiny:wide: 151,665 tokens, 151,936 tied embedding rows).

One engine start serves every check (start-up is most of the cost):
  - padded vocabulary: raw vLLM samples the padding ids, `VLLMEngine.generate` never does, and every request's
    sampling parameters stay within vLLM's per-request caps of its GPU sampler (recorded with the caps read from the
    installed vLLM, for the test to compare);
  - the weight push: after `sync_weights` the engine's log-probs of its sampled tokens equal the trainer's
    recomputed ones; after the trainer's weights change without a push they differ; a second push restores them;
  - the CUDA push (`engines.load_streamed`) through vLLM's own model class and weights loader: a second instance of
    the engine's model built in bf16 (vLLM's GPU dtype) outside the engine, fed by `runtime.full_params` of an FSDP2
    model cast to bf16, as `sync_weights` feeds a GPU engine. Its loaded weights must equal the trainer's; the
    former per-parameter push must fail on the tied head; an uncast fp32 push must draw vLLM's dtype warnings.

    python tests/vllm_check.py MODEL_DIR OUT.json
"""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import common  # noqa: E402
import engines  # noqa: E402
import runtime  # noqa: E402


def logp_gap(engine, model, prompts, n, sampling, vocab, seed) -> tuple[float, int]:
    """Mean |engine log-prob − trainer log-prob| over the sampled tokens, and the largest sampled id."""
    groups = engine.generate(prompts, n, sampling, seed)
    comps = [c for g in groups for c in g]
    flat = [p for p in prompts for _ in range(n)]
    batch = common.Batch.of(flat, [c.token_ids for c in comps], 0, "cpu")
    with torch.no_grad():  # right padding: causal attention needs no mask
        logits_BTV = model(input_ids=batch.ids_BT).logits[:, :-1, :vocab].float() / sampling.temperature
    trainer_BT = logits_BTV.log_softmax(-1).gather(-1, batch.ids_BT[:, 1:, None]).squeeze(-1)
    engine_BT = common.response_grid(flat, [c.logprobs for c in comps], batch.T, "cpu")
    mask_BT = batch.mask_BT[:, 1:]
    gap = ((trainer_BT - engine_BT[:, 1:]).abs() * mask_BT).sum() / mask_BT.sum()
    return gap.item(), max(max(c.token_ids) for c in comps)


def raw_max_id(engine, prompts) -> int:
    """The largest id vLLM samples without the engine's padding mask."""
    sp = engine.vllm.SamplingParams(n=16, temperature=1.0, max_tokens=24, seed=1, detokenize=False)
    raw = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return max(t for o in raw for c in o.outputs for t in c.token_ids)


def cuda_push_through_vllms_loader(engine, trainer, d) -> dict:
    """The GPU push sequence on the CPU: vLLM's model class of this engine (Qwen3ForCausalLM), a second instance
    built in bf16 with vLLM's own initializer, loaded by `engines.load_streamed` from the FSDP2 trainer's
    `full_params` cast to bf16."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype
    cfg = engine.llm.llm_engine.vllm_config
    with set_current_vllm_config(cfg), set_default_torch_dtype(torch.bfloat16):
        gpu_model = initialize_model(vllm_config=cfg, prefix="push_check")  # its own attention-layer names
    warned = []
    handler = logging.Handler()
    handler.emit = lambda r: warned.append(r.getMessage()) if r.getMessage().startswith("Attempted to load") else None
    logging.getLogger("vllm.model_executor.models.utils").addHandler(handler)
    res = {"vllm_model_class": type(gpu_model).__name__,
           "tied_in_vllm": gpu_model.lm_head.weight is gpu_model.model.embed_tokens.weight}
    try:  # the former push: one load_weights call per parameter, over every name of the state dict
        for name, t in runtime.full_params(trainer, torch.bfloat16):
            gpu_model.load_weights(weights=[(name, t)])
        res["per_parameter_push"] = "ok"
    except ValueError as e:
        res["per_parameter_push"] = str(e)
    for aliases in (False, True):  # what sync_weights sends a CUDA engine, and every name: both load
        with torch.no_grad():
            for p in gpu_model.parameters():
                p.zero_()
        warned.clear()
        engines.load_streamed(gpu_model, runtime.full_params(trainer, torch.bfloat16, aliases))
        res[f"dtype_warnings_cast_aliases_{aliases}"] = len(warned)
        res[f"max_abs_diff_vs_trainer_aliases_{aliases}"] = max_diff(gpu_model, trainer)
        res["lm_head_equals_trainer_head"] = bool(torch.equal(gpu_model.lm_head.weight.detach(), trainer.state_dict()[
            "lm_head.weight"].full_tensor().to(torch.bfloat16)))
    res["params_checked"] = len(dict(gpu_model.named_parameters()))
    warned.clear()
    engines.load_streamed(gpu_model, runtime.full_params(trainer))  # fp32 into bf16: what the cast avoids
    res["dtype_warnings_uncast"] = len(warned)
    return res


def max_diff(gpu_model, trainer) -> float:
    """Largest |vLLM parameter − trainer's parameter in bf16| over vLLM's parameters (its fused qkv and gate_up are
    the trainer's projections concatenated)."""
    want = {n: p.full_tensor().to(torch.bfloat16) for n, p in trainer.state_dict().items()}
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    diff = 0.0
    for name, p in gpu_model.named_parameters():
        f = next((f for f in fused if f in name), None)
        ref = torch.cat([want[name.replace(f, part)] for part in fused[f]]) if f else want[name]
        diff = max(diff, (p.detach().float() - ref.float()).abs().max().item())
    return diff


def main(model_dir: str, out: str) -> None:
    d = runtime.init_distributed()
    from transformers import AutoConfig, AutoModelForCausalLM
    tok = runtime.load_tokenizer(model_dir)
    vocab, padded = len(tok), AutoConfig.from_pretrained(model_dir).vocab_size
    assert padded > vocab, (padded, vocab)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = engines.VLLMEngine(model_dir, d, runtime.eos_ids(tok, model_dir), vocab, seed=0, max_model_len=128,
                                gpu_memory_utilization=0.3, sleep_level=2, kv_cache_gib=0.25)
    prompts = [common.encode_prompt(tok, f"What is {a}+{b}?", "{problem}") for a, b in ((12, 34), (250, 99), (7, 8))]
    s = engines.Sampling(max_new_tokens=24, temperature=0.7)
    from vllm.v1.worker.gpu.sample import logit_bias as caps
    sp = engine.params(8, s, 0)
    res = {"vocab": vocab, "padded_vocab": padded, "logit_bias_entries": len(sp.logit_bias or {}),
           "allowed_token_ids": len(sp.allowed_token_ids or []), "max_logit_bias": caps.MAX_NUM_LOGIT_BIAS_TOKENS,
           "max_allowed_token_ids": caps.MAX_NUM_ALLOWED_TOKEN_IDS, "masked_ids": sorted(sp.logit_bias or {}),
           "bias_values": sorted(set((sp.logit_bias or {}).values()))}
    res["masked_max_id_dummy"] = logp_gap(engine, model, prompts, 16, engines.Sampling(24, 1.0), vocab, 1)[1]

    engines.sync_weights(model, engine)
    res["gap_after_push"], res["max_id_after_push"] = logp_gap(engine, model, prompts, 8, s, vocab, 2)
    res["raw_max_id"] = raw_max_id(engine, prompts)  # the bug the mask fixes, on the trained weights
    with torch.no_grad():  # the trainer moves on; the engine is not told
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=1e-2)
    res["gap_stale"] = logp_gap(engine, model, prompts, 8, s, vocab, 3)[0]
    engines.sync_weights(model, engine)
    res["gap_after_second_push"] = logp_gap(engine, model, prompts, 8, s, vocab, 4)[0]

    trainer = runtime.load_model(model_dir, d, trainable=True, vocab=vocab)
    res |= cuda_push_through_vllms_loader(engine, trainer, d)
    Path(out).write_text(json.dumps(res, indent=1))
    engine.close()  # shuts vLLM down, and with it the process group it joined
    runtime.finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
