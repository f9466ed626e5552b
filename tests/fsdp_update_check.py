"""Helper for tests/test_runtime.py, run under `torchrun --nproc_per_node 2`: the shared update skeleton on two FSDP2
ranks against one unsharded model that sees the whole batch, for each loss aggregation.

Eight sequences with unequal response lengths (rank 0 holds the four short ones, rank 1 the four long ones), a
GRPO surrogate with fixed advantages, --num-minibatches 2 of micro-batches of 2, clipping that binds, AdamW. On the
ranks: `runtime.minibatches` / `accumulate` / `optimizer_step`. The reference: optimizer step k takes the k-th
micro-batch of both ranks as one batch, normalised by its global counts. Rank 0 writes the largest differences.

    torchrun --nproc_per_node 2 tests/fsdp_update_check.py DIR
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import common  # noqa: E402
import runtime  # noqa: E402

V, MAX_LEN, LR, CLIP = 48, 12, 1e-2, 0.5
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def sequences():
    """8 (prompt, response, advantage) triples, the same on every rank: rank r owns rows 4r..4r+3."""
    g = torch.Generator().manual_seed(0)
    lengths = [2, 3, 2, 4, 9, 7, 11, 8]  # rank 0 short, rank 1 long: the ranks' token counts differ 2.5x
    out = []
    for n in lengths:
        ids = torch.randint(2, V, (3 + n,), generator=g).tolist()
        out.append((ids[:3], ids[3:], torch.randn((), generator=g).item()))
    return out


def loss_of(model, batch: common.Batch, adv_B: torch.Tensor, agg: str, norm: common.LossNorm) -> torch.Tensor:
    logp_BT, _ = common.token_logprobs(model, batch, V)
    pg_BT, _, _ = common.ppo_clip_loss(logp_BT, logp_BT.detach(), adv_B[:, None].expand_as(logp_BT), 0.2, 0.2)
    return common.agg_loss(pg_BT, batch.mask_BT, agg, norm)


def params(model) -> dict:
    return {k: v.clone() for k, v in runtime.full_params(model)}


def main(out: Path) -> None:
    d = runtime.init_distributed()
    assert d.world == 2, "run under torchrun --nproc_per_node 2"
    path = out / "model"
    if d.main:
        from transformers import Qwen3Config, Qwen3ForCausalLM
        torch.manual_seed(0)
        cfg = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                          pad_token_id=0, eos_token_id=1)
        Qwen3ForCausalLM(cfg).save_pretrained(path)
    runtime.barrier()
    from transformers import AutoModelForCausalLM
    seqs = sequences()
    mine = seqs[4 * d.rank:4 * d.rank + 4]
    res = {}
    for agg in AGGS:
        # --- two FSDP2 ranks through the shared skeleton
        model = runtime.load_model(str(path), d, trainable=True, vocab=V)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
        batch = common.Batch.of([p for p, _, _ in mine], [r for _, r, _ in mine], 0, "cpu")
        adv_B = torch.tensor([a for _, _, a in mine])
        norms, grads = [], None
        for update in runtime.minibatches(batch, micro_batch_size=2, num_minibatches=2):
            for rows, mb, norm in runtime.accumulate(update, MAX_LEN):
                loss_of(model, mb, adv_B[rows], agg, norm).backward()
            if grads is None:  # the first step's reduced gradients, gathered
                grads = {k.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor()
                         for k, p in model.named_parameters()}
            meter = runtime.Meter(clock=False)
            runtime.optimizer_step(model, opt, CLIP, meter)
            norms.append(meter.read()["policy/grad_norm"])
        sharded = params(model)

        # --- one unsharded model, each optimizer step on the matching micro-batches of both ranks at once
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.01)
        ref_norms = []
        for k in range(2):
            part = [seqs[4 * r + 2 * k + j] for r in range(2) for j in range(2)]
            b = common.Batch.of([p for p, _, _ in part], [x for _, x, _ in part], 0, "cpu")
            norm = common.LossNorm(tokens=b.mask_BT.sum().item(), seqs=len(part), max_len=MAX_LEN)
            loss_of(ref, b, torch.tensor([a for _, _, a in part]), agg, norm).backward()
            if k == 0:
                grad_diff = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())
                grad_max = max(p.grad.abs().max().item() for p in ref.parameters())
            ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP).item())
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
        start = {k: v for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}
        res[agg] = {"grad_norms": norms, "ref_grad_norms": ref_norms, "max_grad_diff": grad_diff, "max_grad": grad_max,
                    "max_weight_diff": max((sharded[k] - v.detach()).abs().max().item()
                                           for k, v in ref.state_dict().items()),
                    "max_weight_change": max((v.detach() - start[k]).abs().max().item()
                                             for k, v in ref.state_dict().items())}
    if d.main:
        (out / "update_check.json").write_text(json.dumps(res, indent=1))
    runtime.finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
