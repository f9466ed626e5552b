"""The command line of the tandem scripts: one `Args` dataclass per script, parsed by transformers.HfArgumentParser;
presets are named bundles of default overrides; `--resume RUN` restores a run's own arguments and `--config FILE`
replays them; every argument is checked here, before any process group or model exists, and a bad one exits with
one line naming the flag and the fix (code 2, the argparse convention)."""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

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
REPORT_TO = {"wandb": "wandb", "tensorboard": "tensorboard"}  # --report-to choice -> the package it needs


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


def longest(args, suffix: str) -> tuple[str, int]:
    """(field, value) of the largest of the args' fields ending in `suffix` (a script may have several budgets)."""
    name = max((f.name for f in dataclasses.fields(args) if f.name.endswith(suffix)), key=lambda n: getattr(args, n))
    return name, getattr(args, name)


def engine_length(args) -> int:
    """The longest sequence a run samples or scores: its prompt budget plus its largest response budget (training
    or evaluation); the vLLM engine's `max_model_len`."""
    return longest(args, "max_prompt_tokens")[1] + longest(args, "max_new_tokens")[1]


def max_positions(config) -> int | None:
    """The context a model's config allows: max_position_embeddings, times the RoPE factor of the scalings that
    stretch it (linear, dynamic), as vLLM derives the limit it enforces; None where the config names none."""
    n = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_scaling", None) or {}
    if n and rope.get("rope_type", rope.get("type")) in ("linear", "dynamic") and rope.get("factor"):
        n = int(n * rope["factor"])
    return n


def model_config(name: str, field: str):
    """A model's config (config.json only, no weights) from a folder, the hub cache or the hub, None for a `tiny:`
    model (built here on first use); a model that cannot be reached is one ValueError naming the flag and the ways
    out, after the hub library's own retries (at once with HF_HUB_OFFLINE=1)."""
    if name.startswith("tiny:"):
        return None
    from transformers import AutoConfig

    import common
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag(field)} {name!r} cannot be loaded ({common.first_line(e)}). Give a local model folder, point HF_HOME at "
                         f"a hub cache that holds it (with HF_HUB_OFFLINE=1 on machines without network), or run the "
                         f"toy world with --preset tiny") from None


def check_context(args, fields) -> None:
    """Refuse a run whose longest sequence exceeds a model's context, before anything loads (vLLM would refuse to
    start; an HF model would run past the positions it was trained on)."""
    import tiny
    have = [f.name for f in dataclasses.fields(args)]
    if not any(n.endswith("max_prompt_tokens") for n in have) or not any(n.endswith("max_new_tokens") for n in have):
        return  # nothing sampled or scored (no budgets)
    (prompt, p), (response, r) = longest(args, "max_prompt_tokens"), longest(args, "max_new_tokens")
    length = p + r  # engine_length(args)
    for name in fields:
        value = getattr(args, name)
        if value == "none":
            continue
        config = model_config(value, name)
        limit = max_positions(config) if config is not None else tiny.MAX_POSITIONS
        if limit and length > limit:
            raise ValueError(f"{flag(name)} {value!r} takes {limit} positions (max_position_embeddings), but "
                             f"{flag(prompt)} {p} + {flag(response)} {r} = {length} tokens: lower the budgets to "
                             f"sum to at most {limit}")


def validate_args(args, check=None, models=None, per_step=PER_STEP) -> None:
    """Reject arguments that cannot run, before any process group or model exists; raises ValueError naming the
    flag. `check(args)`: the script's own rules; `models`: the model fields this run loads (a tuple, or a function
    of args), default every MODEL_FIELDS field it has; `per_step`: the prompt counts split over the ranks. Every
    model it loads must be reachable (its config is read) and long enough for the run's sequences."""
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
    tracker = getattr(args, "report_to", "none")
    if tracker != "none":
        import importlib.util
        need = REPORT_TO.get(tracker)
        if need is None:  # the flag's choices are checked by argparse, but a --config replay sets it as a default
            raise ValueError(f"--report-to {tracker!r}: choose none, wandb or tensorboard")
        if importlib.util.find_spec(need) is None:
            raise ValueError(f"--report-to {tracker} needs the {need} package, which is not installed: pip install "
                             f"{need} (or pip install -r requirements-dev.txt), or use --report-to none")
    if check is not None:
        check(args)
    fields = models(args) if callable(models) else models if models is not None else \
        [n for n in MODEL_FIELDS if n in have]
    if hub_offline():
        for name in fields:
            value = getattr(args, name)
            if value != "none" and not findable_offline(value):
                raise ValueError(f"{flag(name)} {value!r}: HF_HUB_OFFLINE=1 and it is neither a local folder, a tiny: "
                                 f"model, nor in the hub cache; download it first (HF_HUB_OFFLINE=0 huggingface-cli "
                                 f"download {value}), point {flag(name)} at a local folder, or run the toy world "
                                 f"with --preset tiny")
    check_context(args, fields)


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
             "grad_checkpointing", "report_to"}


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
    # read by the pre-parser above and dropped from argv; declared here too, so that --help names it
    parser.add_argument("--config", default="", metavar="FILE", help="replay a run as a new one: its config.json (or "
                        "a .json/.yaml of arguments) gives the defaults, explicit flags win")
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
    args, _config, rest = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                             return_remaining_strings=True)
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
