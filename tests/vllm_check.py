"""Helper for tests/test_vllm.py, run as its own process: the real vLLM engine against the trainer's own numbers.

One engine start serves every check (start-up is most of the cost):
  - padded vocabulary: the model's vocab_size is padded past the tokenizer; raw vLLM samples the padding ids,
    `VLLMEngine.generate` never does;
  - the weight push: after `sync_weights` the engine's log-probs of its sampled tokens equal the trainer's
    recomputed ones; after the trainer's weights change without a push they differ; a second push restores them;
  - the engine's log-probs are processed ones (after temperature), as the trainer computes them.

    python tests/vllm_check.py MODEL_DIR OUT.json
"""

import json
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
    res = {"vocab": vocab, "padded_vocab": padded}

    # The bug the mask fixes: vLLM's own sampling, unrestricted, on the engine's initial (dummy) weights.
    sp = engine.vllm.SamplingParams(n=16, temperature=1.0, max_tokens=24, seed=1, detokenize=False)
    raw = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    res["raw_max_id"] = max(t for o in raw for c in o.outputs for t in c.token_ids)
    res["masked_max_id_dummy"] = logp_gap(engine, model, prompts, 16, engines.Sampling(24, 1.0), vocab, 1)[1]

    engines.sync_weights(model, engine)
    res["gap_after_push"], res["max_id_after_push"] = logp_gap(engine, model, prompts, 8, s, vocab, 2)
    with torch.no_grad():  # the trainer moves on; the engine is not told
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=1e-2)
    res["gap_stale"] = logp_gap(engine, model, prompts, 8, s, vocab, 3)[0]
    engines.sync_weights(model, engine)
    res["gap_after_second_push"] = logp_gap(engine, model, prompts, 8, s, vocab, 4)[0]
    Path(out).write_text(json.dumps(res, indent=1))
    engine.close()  # shuts vLLM down, and with it the process group it joined
    runtime.finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
