"""Peak memory and time of the chunked per-token log-prob and full-vocabulary KL (common.py) against a plain full
log_softmax, at Qwen's vocabulary (151,936) and 4,096 response tokens, forward + backward, float32 on the CPU.

    python bench/chunked_logprobs.py [--tokens 4096 --vocab 151936 --hidden 896]

Each variant runs in a fresh process; peak memory is the growth of the process's peak RSS over its inputs.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = ["plain_logprob", "chunked_logprob", "plain_kl", "chunked_kl"]


def one(variant: str, N: int, V: int, H: int, chunk: int, reps: int) -> dict:
    import torch

    import common

    torch.manual_seed(0)
    head, head_t = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    h = torch.randn(N, H, requires_grad=True)
    h_t = torch.randn(N, H)
    y = torch.randint(0, V, (N,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        if variant == "plain_logprob":
            loss = head(h).float().log_softmax(-1).gather(1, y[:, None]).sum()
        elif variant == "chunked_logprob":
            loss = common.logprobs_from_hidden(h, head, y, V, chunk=chunk)[0].sum()
        elif variant == "plain_kl":
            with torch.no_grad():
                t_logits = head_t(h_t)
            loss = common.kl_from_logits(head(h), t_logits).sum()
        else:
            loss = common.kl_from_hidden(h, head, h_t, head_t, V, "reverse", chunk=chunk).sum()
        loss.backward()
        times.append(time.perf_counter() - t0)
        h.grad = None
        head.weight.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "median_s": statistics.median(times[1:]), "peak_extra_gib": (peak - base) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variant", choices=VARIANTS)
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(one(a.variant, a.tokens, a.vocab, a.hidden, a.chunk, a.reps)))
        return
    rows = []
    for v in VARIANTS:
        p = subprocess.run([sys.executable, __file__, "--variant", v, "--tokens", str(a.tokens), "--vocab",
                            str(a.vocab), "--hidden", str(a.hidden), "--chunk", str(a.chunk), "--reps", str(a.reps)],
                           capture_output=True, text=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
                    {"variant": v, "median_s": float("nan"), "peak_extra_gib": float("nan"), "error": p.stderr[-300:]})
    lines = [f"N={a.tokens} tokens, V={a.vocab}, H={a.hidden}, chunk={a.chunk}, fp32, forward+backward", "",
             "| variant | median time (s) | peak extra memory (GiB) |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['median_s']:.2f} | {r['peak_extra_gib']:.2f} |" for r in rows]
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "chunked_logprobs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
