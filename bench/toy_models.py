"""What each toy model can do: held-out accuracy per task family (4 samples x 128 problems each) and how often it
works the answer out rather than boxing one at once, at T = 1 and greedy. Builds the warm starts first if needed.
The toy-world table (docs/toy-world.md) is this script's output at T = 1.

    python bench/toy_models.py [--n 128]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import engines  # noqa: E402
import tiny  # noqa: E402
import verifiers  # noqa: E402


def describe(path: str, families: str = "add,mul,lin", n: int = 128, temperature: float = 1.0) -> dict:
    """{family: {accuracy, worked_out}} of the model at `path`, sampled by the HF engine with a fixed seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    eng = engines.HFEngine(AutoModelForCausalLM.from_pretrained(path), [tok.eos_token_id], tok.pad_token_id, len(tok),
                           batch_size=256)
    out = {}
    for fam in families.split(","):
        rows = tiny.make_split(fam, "test", n, 0)
        prompts = [common.encode_prompt(tok, r["problem"], "{problem}") for r in rows]
        groups = eng.generate(prompts, 4, engines.Sampling(48, temperature=temperature), seed=0)
        texts = [(tok.decode(c.token_ids, skip_special_tokens=True), r["answer"])
                 for r, g in zip(rows, groups) for c in g]
        out[fam] = {"accuracy": sum(verifiers.last_boxed(t) == a for t, a in texts) / len(texts),
                    "worked_out": sum(not t.lstrip().startswith("\\boxed") for t, _ in texts) / len(texts)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128, help="held-out problems per family")
    a = ap.parse_args()
    for temp in (1.0, 0.0):
        print(f"\n| model (T = {temp:g}, 4 samples x {a.n} held-out problems) | add | mul | lin | works it out |")
        print("|---|---|---|---|---|")
        for size in tiny.SIZES:
            stats = describe(str(tiny.warm_start(size)), n=a.n, temperature=temp)
            worked = " / ".join(f"{v['worked_out']:.0%}" for v in stats.values())
            print(f"| tiny:{size} | " + " | ".join(f"{v['accuracy']:.2f}" for v in stats.values()) + f" | {worked} |")


if __name__ == "__main__":
    main()
