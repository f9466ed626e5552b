"""Docs that cannot rot: every relative link in README.md and docs/ resolves (files, and headings for #anchors), every
command line in them (and in the scripts' own docstrings) that runs one of the scripts parses with that script's own
argument parser and passes its checks, without running it, and --help names every flag a script accepts."""

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_args import CONTEXT

import cli

SCRIPTS = ("kdrl", "codistill_grpo", "s2l_po", "copd", "sparse_to_dense", "evaluate")
# studies that pass the flags after `--` to a script, after flags of their own
STUDIES = {"bench/copd_study.py": ("copd", ["--preset", "tiny"]), "bench/sparse_to_dense_study.py": ("sparse_to_dense", []),
           "bench/codistill_speed.py": ("codistill_grpo", [])}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces to -."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def fenced(text: str) -> tuple[list[tuple[str, str]], str]:
    """((language, body) of each code block, the prose) of a markdown page: a block runs from a line opening with ```
    to the next."""
    blocks, prose, block, lang = [], [], None, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if block is None:
                block, lang = [], line.strip()[3:]
            else:
                blocks.append((lang, "\n".join(block) + "\n"))
                block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    return blocks, "\n".join(prose)


def split_code(text: str) -> tuple[list[str], str]:
    blocks, prose = fenced(text)
    return [body for _, body in blocks], prose


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", split_code(page.read_text())[1], flags=re.M)}


def links(page: Path) -> list[str]:
    prose = re.sub(r"(`+).+?\1", "", split_code(page.read_text())[1], flags=re.S)  # no links inside code spans
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", prose) if not re.match(r"[a-z]+:", m)]


def broken_links(page: Path) -> list[str]:
    bad = []
    for link in links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            bad.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            bad.append(f"{link} (no such heading)")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    assert not broken_links(page), broken_links(page)


def commands(text: str) -> list[str]:
    """Command lines in a page: the lines of its code blocks (continuations joined, comments dropped) and its
    inline code spans, from `python` or `torchrun` on."""
    blocks, prose = split_code(text)
    out = [re.sub(r"\s#\s.*$", "", line) for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    out += [m[1].replace("\n", " ") for m in re.findall(r"(`+)(.+?)\1", prose, flags=re.S)]
    found = []
    for c in out:
        for part in re.split(r"&&|;", c):
            m = re.search(r"\b(python3?|torchrun)\s.*", part)
            if m:
                found.append(m.group(0).strip())
    return found


def docstring_commands(text: str) -> list[str]:
    """The run commands of a module docstring: its lines that start with `python` or `torchrun` (continued by `\\`)."""
    lines = [re.sub(r"\s#\s.*$", "", line) for line in text.replace("\\\n", " ").splitlines()]
    return [part.strip() for line in lines if re.match(r"\s*(python3?|torchrun)\s", line)
            for part in re.split(r"&&|;", line)]


def script_argv(command: str) -> tuple[str, list[str], int] | None:
    """(script, its argv, world size) of a command that runs one of the scripts (directly or through a study's `--`),
    or None for anything else."""
    words = shlex.split(command)
    world, i = 1, 1
    if words[0] == "torchrun":
        opts = {}
        while i < len(words) and words[i].startswith("--"):
            key, _, val = words[i].partition("=")
            if not val and i + 1 < len(words) and not words[i + 1].endswith(".py"):
                val, i = words[i + 1], i + 1
            opts[key.replace("_", "-")] = val
            i += 1
        world = int(opts.get("--nproc-per-node", 1)) * int(opts.get("--nnodes", 1))
    if i >= len(words) or not words[i].endswith(".py"):
        return None
    script, argv = words[i], words[i + 1:]
    if script in STUDIES and "--" in argv:
        name, own = STUDIES[script]
        return name, own + argv[argv.index("--") + 1:], world
    name = Path(script).stem
    return (name, argv, world) if script == f"{name}.py" and name in SCRIPTS else None


def page_commands() -> list[tuple[str, str]]:
    found = [(str(p.relative_to(ROOT)), c) for p in PAGES for c in commands(p.read_text())]
    found += [(f"{s}.py docstring", c) for s in SCRIPTS for c in docstring_commands(importlib.import_module(s).__doc__)]
    return [(where, c) for where, c in found if script_argv(c)]


def parse(command: str, tmp_path, monkeypatch) -> None:
    """Parse a documented command with its script's own parser and checks (the models' contexts from CONTEXT, as the
    hub serves their configs); exits 2 with the argparse message on a bad flag or value."""
    name, argv, world = script_argv(command)
    replay = tmp_path / "config.json"
    replay.write_text('{"args": {}}')
    argv = [str(replay) if i and argv[i - 1] == "--config" else a for i, a in enumerate(argv)]  # a run to replay
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    real = cli.model_config
    monkeypatch.setattr(cli, "model_config", lambda n, f: real(n, f) if n.startswith("tiny:") or Path(n).is_dir() else
                        type("C", (), {"max_position_embeddings": CONTEXT.get(n, 1 << 20)})())
    mod = importlib.import_module(name)
    per_step = () if name in ("copd", "sparse_to_dense") else cli.PER_STEP
    args = cli.parse_args(mod.Args, mod.PRESETS, argv, getattr(mod, "check_args", None),
                          getattr(mod, "model_fields", None), per_step)
    if name == "copd":
        mod.plan(args, world)


DOCUMENTED = page_commands()


def test_the_pages_hold_commands():
    assert len(DOCUMENTED) > 30 and {script_argv(c)[0] for _, c in DOCUMENTED} == set(SCRIPTS)


@pytest.mark.parametrize("where,command", DOCUMENTED, ids=[f"{w}: {c[:70]}" for w, c in DOCUMENTED])
def test_documented_command_parses(where, command, tmp_path, monkeypatch, capsys):
    try:
        parse(command, tmp_path, monkeypatch)
    except SystemExit as e:
        pytest.fail(f"{where}: `{command}` does not parse (exit {e.code}): {capsys.readouterr().err.strip()}")


def test_a_bad_flag_or_value_in_a_page_fails(tmp_path, monkeypatch):
    """The check above catches what it is for: an unknown flag, and a value the flag does not take."""
    for bad in ("python kdrl.py --preset tiny --group-sise 4", "python copd.py --preset tiny --mode mixd",
                "torchrun --nproc_per_node 3 kdrl.py --preset tiny"):
        with pytest.raises(SystemExit):
            parse(bad, tmp_path, monkeypatch)
    page = tmp_path / "page.md"
    page.write_text("[a](README.md) [b](no/such.md) [c](README.md#no-such-heading) [d](#tandem) [e](https://x.org)")
    (tmp_path / "README.md").write_text("# tandem\n")
    assert broken_links(page) == ["no/such.md (no such file)", "README.md#no-such-heading (no such heading)",
                                  "#tandem (no such heading)"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_every_flag(script):
    mod = importlib.import_module(script)
    out = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120).stdout
    names = [cli.flag(f.name) for f in __import__("dataclasses").fields(mod.Args)]
    flat = out.replace("_", "-")
    assert all(n in flat for n in names) and "--config" in out, [n for n in names if n not in flat]


def test_the_forking_guide_runs(tmp_path, warm, monkeypatch):
    """docs/forking.md, done as it says: its diff applies to kdrl.py, its unit test passes (and fails on the broken
    variant the page names), its commands parse with the fork's own parser, and the fork runs its tiny preset."""
    page = (ROOT / "docs" / "forking.md").read_text()
    blocks, _ = fenced(page)
    diff = next(body for lang, body in blocks if lang == "diff")
    test = next(body for lang, body in blocks if lang == "python" and body.startswith("# tests/test_kdrl_huber.py"))
    (tmp_path / "kdrl_huber.py").write_text((ROOT / "kdrl.py").read_text())
    (tmp_path / "fork.diff").write_text(diff)
    p = subprocess.run(["git", "apply", "-p0", "fork.diff"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, f"the page's diff no longer applies to kdrl.py: {p.stderr}"
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_kdrl_huber.py").write_text(test)
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "HF_HUB_OFFLINE": "1"}
    unit = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kdrl_huber.py"]
    p = subprocess.run(unit, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    fork = (tmp_path / "kdrl_huber.py").read_text()
    (tmp_path / "kdrl_huber.py").write_text(fork.replace("c * (d_BT.abs() - 0.5 * c)", "c * (d_BT.abs() - c)"))
    p = subprocess.run(unit, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "test_huber_kd_against_a_loop" in p.stdout, p.stdout[-3000:]
    (tmp_path / "kdrl_huber.py").write_text(fork)

    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("kdrl_huber")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    runs = [shlex.split(c) for c in commands(page)]
    runs = [w for w in runs if next((x for x in w if x.endswith(".py")), "") == "kdrl_huber.py" and "--help" not in w]
    assert len(runs) >= 2
    monkeypatch.setattr(cli, "model_config", lambda n, f: None if n.startswith("tiny:") else
                        type("C", (), {"max_position_embeddings": CONTEXT[n]})())
    for words in runs:
        monkeypatch.setenv("WORLD_SIZE", str(int(words[2]) if words[0] == "torchrun" else 1))
        cli.parse_args(mod.Args, mod.PRESETS, words[words.index("kdrl_huber.py") + 1:], mod.check_args)
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, str(tmp_path / "kdrl_huber.py"), "--preset", "tiny", "--kd-estimator", "huber",
                        "--kd-huber-delta", "1.0", "--total-steps", "2", "--eval-every", "2", "--eval-limit", "8",
                        "--eval-samples", "2", "--prompts-per-step", "4", "--group-size", "4", "--save-every", "0",
                        "--output-dir", str(run)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [__import__("json").loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss/kd"] > 0 for r in rows)
    assert __import__("json").loads((run / "config.json").read_text())["args"]["kd_estimator"] == "huber"
