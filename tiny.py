"""The toy world behind `--preset tiny`: everything a method needs to run, and visibly learn, on a laptop CPU.

- A byte-level BPE tokenizer built locally (digits split one per token), with a ChatML chat template.
- Tiny Qwen3 configs, "small" (0.34M parameters) and "large" (0.89M), sharing that tokenizer. Their `vocab_size`
  is padded differently (as Qwen pads 151,936 vs 152,064 across sizes), and only the small one ties its
  embeddings, so the scripts' slicing to `len(tokenizer)` and both head layouts are exercised.
- Synthetic verifiable task families whose worked solutions end in `\\boxed{answer}`:
  `add` (column addition with carries), `mul` (multi-digit times one digit), `lin` (solve a*x+b=c).
- A supervised warm start per model, deterministic and cached on disk keyed by its settings.

What makes learning visible in tens of CPU steps. A tiny model's arithmetic is fragile: Adam moves every weight
by about the learning rate per step, so steps large enough to teach it new facts also erase old ones, and steps
small enough to be safe change nothing in 40 steps. So the toy world gives RL and distillation what they do best
in real LLMs: choosing between behaviours the model already has. The small model's warm start answers 30% of
its targets at once (`\\boxed{N}`, which it cannot compute) and works the rest out step by step (which it gets
right about half the time); the large model always works it out. At temperature 1 the small model starts about
30% of its answers directly and scores ~0.32 on average; GRPO learns to work things out first (responses grow
longer, as in R1-Zero), distillation pulls it toward the teacher's habit, and held-out accuracy rises by ~0.09
in 40 steps while the KL to the teacher falls threefold. `python bench/toy_models.py` prints the starting point.

A third size, "base", is the large architecture warm-started to answer 80% of its targets at once, like an untuned
base model that rarely reasons: the learner of s2l_po.py, whose frozen explorer is the small model. The large
model already works every problem out, so it has nothing to learn from the small one's rollouts; the base model
has, because the small model works most of its answers out and so writes the behaviour that earns reward. A fourth,
"hasty", is the same fine-tune answering at once 98% of the time: its own samples rarely hold a worked solution, so
plain GRPO rarely sees one, which is the setting S2L-PO's explorer is for.

Model and data names of the form `tiny:small`, `tiny:large`, `tiny:add,lin` are resolved here (through
`resolve_model` and `make_split`); nothing else in the scripts needs to know about the toy world.

    python tiny.py            # build (or reuse) the warm starts; python bench/toy_models.py: what each can do
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

VERSION = 2  # bump when anything below changes what a warm start produces; it is part of the cache key

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------
# Tasks: each family maps a random generator to (problem, worked solution, answer)
# ----------------------------------------------------------------------------------------------------------
def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    return f"What is {a}+{b}?", ", ".join(steps) + f". \\boxed{{{a + b}}}", str(a + b)


def _mul(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 999), rng.randint(2, 9)
    steps, carry = [], 0
    for d in str(a)[::-1]:
        s = int(d) * b + carry
        steps.append(f"{d}*{b}+{carry}={s}" if carry else f"{d}*{b}={s}")
        carry = s // 10
    return f"What is {a}*{b}?", ", ".join(steps) + f". \\boxed{{{a * b}}}", str(a * b)


def _lin(rng: random.Random) -> tuple[str, str, str]:
    a, x, b = rng.randint(2, 9), rng.randint(0, 12), rng.randint(1, 50)
    c = a * x + b
    return (f"Solve {a}x+{b}={c} for x.", f"{a}x={c}-{b}={c - b}, x={c - b}/{a}={x}. \\boxed{{{x}}}", str(x))


def _add_dot(rng: random.Random) -> tuple[str, str, str]:
    """`add` asked with a full stop for its question mark: the same task behind a one-token cue (tiny:cue_dot, tiny:cue_think)."""
    problem, solution, answer = _add(rng)
    return problem[:-1] + ".", solution, answer


def _add_word(rng: random.Random) -> tuple[str, str, str]:
    """`add` asked in other words, "Compute a+b.": the same task behind a cue of a few tokens (tiny:cue_word)."""
    problem, solution, answer = _add(rng)
    return "Compute" + problem[len("What is"):-1] + ".", solution, answer


TASKS = {"add": _add, "mul": _mul, "lin": _lin, "add_dot": _add_dot, "add_word": _add_word}
TOKENIZER_TASKS = ("add", "mul", "lin")  # the tokenizer's corpus; a family added later must not change it


def _is_test(problem: str, family: str = "") -> bool:
    """A fixed 1-in-8 hash split of the problem space: train and test never share a problem (nor, between `add` and
    its reworded variants, a sum)."""
    if family in ("add_dot", "add_word"):  # split on the `add` problem of the same sum
        problem = f"What is {problem.split()[-1][:-1]}?"
    return int(hashlib.sha256(problem.encode()).hexdigest(), 16) % 8 == 0


def make_split(spec: str, split: str, n: int, seed: int) -> list[dict]:
    """`n` distinct problems of the families in `spec` (e.g. "add,lin"), interleaved, from `split` ("train" or
    "test"). Rows carry `problem`, `answer`, `solution` and `task`, the format of ../shared/data/benchmarks."""
    families = [f.strip() for f in spec.split(",") if f.strip()]
    unknown = [f for f in families if f not in TASKS]
    if unknown or not families:
        raise ValueError(f"unknown tiny task family {unknown or spec!r}; choose from {sorted(TASKS)}, comma-separated")
    rng, rows, seen = random.Random(f"{spec}|{split}|{seed}"), [], set()
    while len(rows) < n:
        fam = families[len(rows) % len(families)]
        problem, solution, answer = TASKS[fam](rng)
        if problem in seen or _is_test(problem, fam) != (split == "test"):
            continue
        seen.add(problem)
        rows.append({"problem": problem, "answer": answer, "solution": solution, "task": fam})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and model configs
# ----------------------------------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int = 256 + 64):
    """Byte-level BPE trained on the task text: any string is encodable, digits stay one token each (so the
    arithmetic is learnable), and the fixed phrases become a few tokens (so sequences are short)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = [" ".join(TASKS[f](rng)[:2]) for _ in range(400) for f in TOKENIZER_TASKS]
    corpus += ["Please reason step by step, and put your final answer within \\boxed{}.",
               "<think> </think> <answer> </answer>"] * 50
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, padding_side="left", model_max_length=512)


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int      # 32: a head size vLLM's CPU attention supports (it rejects 24, hidden // heads of the small model)
    intermediate: int
    vocab_pad: int     # config.vocab_size = len(tokenizer) rounded up to this multiple (Qwen-style padding)
    tied: bool         # Qwen2.5-0.5B ties embeddings, 7B does not: both paths get exercised
    warm_steps: int    # supervised warm-start steps: few for the small model (partial accuracy), many for the large
    warm_lr: float
    direct_frac: float  # share of warm-start targets that skip the worked steps and answer at once
    habits: tuple = ()  # per-family habits ((family, "direct" | "unboxed" | "tagged" | "think", share), ...): `_target`
    init_from: str = ""  # start from this size's warm start (same architecture) instead of random weights
    warm_tasks: str = ""  # families of the warm-start data (empty: WARM_TASKS)
    wide: bool = False  # `init_from`'s model and tokenizer widened to a Qwen-sized vocabulary (`widen`), no training


# the two architectures; every size is one of them, with its own warm start
SMALL_ARCH = dict(hidden=96, layers=3, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab_pad=64, tied=True)
LARGE_ARCH = dict(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, intermediate=384, vocab_pad=128, tied=False)

SIZES = {
    "small": Size(**SMALL_ARCH, warm_steps=560, warm_lr=3e-3, direct_frac=0.3),
    "large": Size(**LARGE_ARCH, warm_steps=600, warm_lr=3e-3, direct_frac=0.0),
    # The small architecture with a *different* bad habit in each of two families, so that what RL fixes in one
    # family is not what it fixes in the other (two capabilities, for co-training methods such as CoPD):
    # `add` answers at once 60% of the time, `lin` works the answer out but leaves it unboxed 60% of the time.
    "habits": Size(**SMALL_ARCH, warm_steps=560, warm_lr=3e-3, direct_frac=0.0,
                   habits=(("add", "direct", 0.6), ("lin", "unboxed", 0.6))),
    # Two capabilities that compete for one behaviour, for CoPD's interference world: the small architecture writes
    # its final answer as `\\boxed{N}` or as `<answer>N</answer>` half the time each, in both families; the `add`
    # branch is graded on the box and the `lin` branch on the tag (copd.py --verifiers math math_tag), so what RL on
    # one family rewards is what RL on the other punishes, unless the model learns to tell the two apart.
    "formats": Size(**SMALL_ARCH, warm_steps=560, warm_lr=3e-3, direct_frac=0.0,
                    habits=(("add", "tagged", 0.5), ("lin", "tagged", 0.5))),
    # The interference world behind a cue: the same addition problems, asked as `add` ("What is a+b?", graded on the
    # box) or reworded (graded on the tag), boxed or tagged half the time each; the wording is all that tells the two
    # capabilities apart, so one model must learn to read it, while each expert need not. `cue_dot` rewords with one
    # token (a full stop for the question mark, `add_dot`), `cue_word` with a few ("Compute a+b.", `add_word`); both
    # decide the format at the end of the response, far from the cue. `cue_think` uses the one-token cue with the
    # decision next to it: its tagged answers are R1-style, `<think> steps </think> <answer>N</answer>`, so the first
    # token of the response already commits to the format.
    "cue_dot": Size(**SMALL_ARCH, warm_steps=560, warm_lr=3e-3, direct_frac=0.0, warm_tasks="add,add_dot",
                    habits=(("add", "tagged", 0.5), ("add_dot", "tagged", 0.5))),
    "cue_word": Size(**SMALL_ARCH, warm_steps=560, warm_lr=3e-3, direct_frac=0.0, warm_tasks="add,add_word",
                     habits=(("add", "tagged", 0.5), ("add_word", "tagged", 0.5))),
    "cue_think": Size(**SMALL_ARCH, warm_steps=560, warm_lr=3e-3, direct_frac=0.0, warm_tasks="add,add_dot",
                      habits=(("add", "think", 0.5), ("add_dot", "think", 0.5))),
    # s2l_po.py's learner: the large model, fine-tuned into an untuned base model's habit of answering at once
    # (trained from scratch on such targets, the large architecture never learns the arithmetic it then skips)
    "base": Size(**LARGE_ARCH, warm_steps=200, warm_lr=1e-3, direct_frac=0.8, init_from="large"),
    # the same fine-tune, answering at once 98% of the time: its own samples rarely hold a worked (and so correct)
    # solution, the precondition of S2L-PO's explorer (bench/s2l_passk.py measures it)
    "hasty": Size(**LARGE_ARCH, warm_steps=200, warm_lr=1e-3, direct_frac=0.98, init_from="large"),
    # the small model behind Qwen2.5's vocabulary shape (`widen`): what the toy models are too small to exercise (the
    # padded-vocabulary mask, vLLM's per-request caps, chunked log-probs at V = 151,936, a tied 151,936-row push)
    "wide": Size(**SMALL_ARCH, warm_steps=0, warm_lr=0.0, direct_frac=0.3, init_from="small", wide=True),
}
WIDE_TOKENS, WIDE_ROWS = 151_665, 151_936  # Qwen2.5's len(tokenizer) and embedding rows (config.vocab_size)
WARM_TASKS = "add,mul,lin"
MAX_POSITIONS = 256  # every toy model's context (max_position_embeddings)
WARM_BATCH = 64
WARM_SEED = 0


def build_model(size: str, tokenizer, seed: int = WARM_SEED):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    s = SIZES[size]
    vocab = math.ceil(len(tokenizer) / s.vocab_pad) * s.vocab_pad
    config = Qwen3Config(vocab_size=vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         head_dim=s.head_dim, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=s.tied,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         rope_theta=10000.0)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def prompt_text(tokenizer, problem: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                         add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------------------
# Warm start: supervised next-token training on worked solutions, cached on disk
# ----------------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem"))


def _key(size: str) -> str:
    import torch
    import transformers

    spec = asdict(SIZES[size])
    for field in ("warm_tasks", "wide"):  # absent from the keys of the sizes that predate them: their caches stay valid
        if not spec[field]:
            del spec[field]
    if spec["init_from"]:  # a fine-tune is rebuilt with its parent
        spec["init_key"] = _key(spec["init_from"])
    blob = json.dumps({"v": VERSION, "size": spec, "tasks": WARM_TASKS, "batch": WARM_BATCH,
                       "seed": WARM_SEED, "torch": torch.__version__.split("+")[0],
                       "transformers": transformers.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _target(s: Size, row: dict, u: float) -> str:
    """The warm-start target of one problem, given a uniform draw `u`: by default the worked solution, or a direct
    `\\boxed{answer}` with probability `direct_frac`. A family's habit overrides that: "direct" answers at once,
    "unboxed" writes the worked solution without its final `\\boxed{}` (so the verifier finds no answer), "tagged"
    writes it with the answer in `<answer>N</answer>` instead of the box, "think" writes it R1-style,
    `<think> steps </think> <answer>N</answer>`."""
    habit = next(((h, share) for fam, h, share in s.habits if fam == row["task"]), None)
    if habit is None:
        return f"\\boxed{{{row['answer']}}}" if u < s.direct_frac else row["solution"]
    kind, share = habit
    if u >= share:
        return row["solution"]
    if kind == "direct":
        return f"\\boxed{{{row['answer']}}}"
    if kind == "unboxed":
        return row["solution"].rsplit(" \\boxed{", 1)[0]
    if kind == "tagged":
        return row["solution"].rsplit(" \\boxed{", 1)[0] + f" <answer>{row['answer']}</answer>"
    if kind == "think":
        return "<think> " + row["solution"].rsplit(" \\boxed{", 1)[0] + f" </think> <answer>{row['answer']}</answer>"
    raise ValueError(f"unknown habit {kind!r}; use 'direct', 'unboxed', 'tagged' or 'think'")


def _train(size: str, out: Path, log=print) -> None:
    import torch

    torch.manual_seed(WARM_SEED)
    tokenizer = build_tokenizer()
    s = SIZES[size]
    if s.init_from:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(warm_start(s.init_from, log=log), dtype=torch.float32)
    else:
        model = build_model(size, tokenizer)
    if s.wide:
        model, tokenizer = widen(model, tokenizer)
    rows = make_split(s.warm_tasks or WARM_TASKS, "train", s.warm_steps * WARM_BATCH // 4,
                      seed=WARM_SEED)  # each seen ~4 times
    eos, style = tokenizer.eos_token_id, random.Random(WARM_SEED + 1)
    examples = []
    for r in rows:
        p = tokenizer(prompt_text(tokenizer, r["problem"]), add_special_tokens=False).input_ids
        c = tokenizer(_target(s, r, style.random()), add_special_tokens=False).input_ids + [eos]
        examples.append((p, c))
    opt = torch.optim.AdamW(model.parameters(), lr=s.warm_lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, s.warm_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, s.warm_steps) / max(1, s.warm_steps))))
    order = random.Random(WARM_SEED)
    model.train()
    t0 = time.time()
    for step in range(s.warm_steps):
        batch = order.sample(examples, WARM_BATCH)
        T = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((WARM_BATCH, T), tokenizer.pad_token_id)
        labels = torch.full((WARM_BATCH, T), -100)
        for i, (p, c) in enumerate(batch):  # right padding: no position offsets needed for training
            seq = p + c
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(p):len(seq)] = torch.tensor(c)  # learn the solution only, not the prompt
        # float32 throughout: bf16 autocast is 10x slower than fp32 on CPUs without native bf16 (AVX2 only)
        loss = model(input_ids=ids, labels=labels).loss  # right padding: causal attention needs no mask
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == s.warm_steps - 1:
            log(f"[tiny] warm start {size}: step {step}/{s.warm_steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    mask = os.umask(0)
    os.umask(mask)
    for f in out.iterdir():  # transformers writes safetensors through a 0600 temporary file
        f.chmod(0o666 & ~mask)
    (out / "tandem_tiny.json").write_text(json.dumps({"size": size, "key": _key(size), **asdict(SIZES[size])}))


def widen(model, tokenizer):
    """`model` and `tokenizer` with Qwen2.5's vocabulary shape, computing what they computed before: the tokenizer
    gains unused tokens up to WIDE_TOKENS ids (no merge ever produces them, so every text encodes as before), the
    tied embedding grows to WIDE_ROWS rows. The new tokens' rows point away from every final hidden state of the
    model on its own warm-start data (a direction û with h·û > 0 for all of them, found by a few hundred steps of a
    soft margin), scaled so that their logits sit ~40 nats below the real ones: the model samples them with
    probability ~1e-13. The padding rows past the tokenizer point the other way, as if trained into the largest
    logits: a sampler that does not mask the padded vocabulary samples them at once, the failure they are here to
    show (the trainer's logits are sliced to the tokenizer, and the engines mask them)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(tokenizer), WIDE_TOKENS):
        vocab[f"<unused_{i}>"] = i
    wide_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE, padding_side="left",
                                       model_max_length=512)
    assert len(wide_tok) == WIDE_TOKENS, len(wide_tok)
    rows = make_split(WARM_TASKS, "train", 256, seed=WARM_SEED)
    with torch.no_grad():
        h_NH = torch.cat([model(**tokenizer(prompt_text(tokenizer, r["problem"]) + r["solution"], return_tensors="pt",
                                            add_special_tokens=False), output_hidden_states=True).hidden_states[-1][0]
                          for r in rows])
    u_H = h_NH.mean(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([u_H], lr=0.05)
    for _ in range(500):
        loss = torch.nn.functional.softplus(-4 * h_NH @ (u_H / u_H.norm())).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    u_H = (u_H / u_H.norm()).detach()
    margin = float((h_NH @ u_H).min())
    assert margin > 0, f"no direction separates the final hidden states (min margin {margin})"
    old = model.get_input_embeddings().weight.data
    model.resize_token_embeddings(WIDE_ROWS, mean_resizing=False)
    emb = model.get_input_embeddings().weight.data
    emb[:old.shape[0]] = old
    emb[old.shape[0]:WIDE_TOKENS] = -(40 / margin) * u_H
    emb[WIDE_TOKENS:] = (40 / margin) * u_H
    model.tie_weights()
    model.config.vocab_size = WIDE_ROWS
    return model, wide_tok


def warm_start(size: str, log=print) -> Path:
    """Path of the warm-started `size` model, training it first if no cached copy exists. Safe to call from
    several processes at once (torchrun ranks, parallel tests): one trains, the others wait on a file lock."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose from {sorted(SIZES)}")
    root = cache_root() / "tiny"
    path = root / f"{size}-{_key(size)}"
    if (path / "tandem_tiny.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{size}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "tandem_tiny.json").exists():
            tmp = root / f".{path.name}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            _train(size, tmp, log=log)
            os.replace(tmp, path)  # atomic: a half-written warm start is never visible
    return path


def resolve_model(name: str, log=print) -> str:
    """`tiny:small` / `tiny:large` -> the cached warm-start folder; anything else is returned unchanged."""
    if name.startswith("tiny:"):
        return str(warm_start(name.split(":", 1)[1], log=log))
    return name


if __name__ == "__main__":
    for size in SIZES:
        t0 = time.time()
        print(f"{size}: {warm_start(size)} ({time.time() - t0:.0f}s)")
    print("what each model can do: python bench/toy_models.py")
