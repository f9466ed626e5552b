"""Helper for tests/test_runtime.py, run under torchrun: FSDP2 gradients through the chunked LM head vs an unsharded
model, the memory a frozen model holds after scoring, weight sync into the rollout engine, and a DCP checkpoint that
reloads on another world size.

    torchrun --nproc_per_node 2 tests/fsdp_check.py DIR        # check, then save DIR/run/checkpoints/step_1
    python tests/fsdp_check.py DIR --reload                    # reload that checkpoint on one rank
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import common  # noqa: E402
import engines  # noqa: E402
import runtime  # noqa: E402


def main(out: Path, reload: bool) -> None:
    d = runtime.init_distributed()
    path = out / "model"
    if d.main and not reload:
        from transformers import Qwen3Config, Qwen3ForCausalLM
        torch.manual_seed(0)
        cfg = Qwen3Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                          pad_token_id=0, eos_token_id=1)
        Qwen3ForCausalLM(cfg).save_pretrained(path)
    runtime.dist.barrier()
    model = runtime.load_model(str(path), d, trainable=True, vocab=44)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if reload:
        runtime.load_checkpoint(runtime.find_checkpoint(str(out / "run")), {"m": model}, {"m": opt}, d)
        want = json.loads((out / "after_step.json").read_text())
        got = {n: float(p.full_tensor().double().sum()) for n, p in model.state_dict().items()}
        assert all(abs(got[n] - want[n]) < 1e-9 for n in want), "reloaded weights differ"
        assert len(opt.state) > 0, "optimizer state was not restored"
        print("reload ok")
        return

    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = [[int(x) for x in torch.randint(2, 44, (3 + i,), generator=g)] for i in range(4)]
    resps = [[int(x) for x in torch.randint(2, 44, (5 - i % 2,), generator=g)] for i in range(4)]
    weights = torch.randn(4, 12, generator=g)

    def loss_of(m, rows):
        batch = common.Batch.of([prompts[r] for r in rows], [resps[r] for r in rows], 0, "cpu")
        logp, _ = common.token_logprobs(m, batch, vocab=44, chunk=3)
        return (logp * weights[rows, :batch.T]).sum()

    mine = [d.rank * 2, d.rank * 2 + 1] if d.world == 2 else [0, 1, 2, 3]
    loss_of(model, mine).backward()  # FSDP2 averages gradients over ranks
    ref_loss = sum(loss_of(ref, [r]) for r in range(4)) / (4 // len(mine))
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        gfull = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(gfull, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")

    # A frozen model scored the way the scripts score a teacher holds only its shards once released: FSDP2 leaves
    # the root (embeddings, norm, head) gathered after a no_grad forward, and no backward ever frees it.
    frozen = runtime.load_model(str(path), d, trainable=False, vocab=44)
    common.score_logprobs(frozen, common.Batch.of(prompts, resps, 0, "cpu"), 44, 1.0, 2, chunk=3)
    runtime.release(frozen)
    gathered = {n: p.untyped_storage().nbytes() for n, p in frozen.named_parameters() if not isinstance(p, DTensor)}
    shards = sum(p.to_local().untyped_storage().nbytes() for p in frozen.parameters() if isinstance(p, DTensor))
    total = sum(p.numel() * p.element_size() for p in ref.parameters())
    assert not gathered and shards * d.world == total, \
        f"rank {d.rank}: a scored frozen model holds {sum(gathered.values())} bytes of gathered parameters " \
        f"{sorted(gathered)} beside {shards} bytes of shards (its whole size is {total} bytes over {d.world} ranks)"

    engine = engines.HFEngine.replica(str(path), d, [1], 0, 44, 8)
    opt.step()
    engines.sync_weights(model, engine)
    assert "lm_head.weight" not in dict(runtime.full_params(model, aliases=False))  # the tied head: the embedding
    for name, t in runtime.full_params(model, torch.bfloat16):  # cast on each rank's shard, then gathered
        assert t.dtype == torch.bfloat16 and torch.equal(t, model.state_dict()[name].full_tensor().to(torch.bfloat16))
    full = {n: p.full_tensor() for n, p in model.state_dict().items()}
    for name, t in engine.model.state_dict().items():
        torch.testing.assert_close(t, full[name], msg=lambda m, name=name: f"engine {name}: {m}")
    runtime.save_checkpoint(out / "run", 1, {"m": model}, {"m": opt}, {"data": {}}, d, keep=2)
    if d.main:
        (out / "after_step.json").write_text(json.dumps({n: float(t.double().sum()) for n, t in full.items()}))
    print(f"rank {d.rank} ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--reload" in sys.argv)
