"""What `diff kdrl.py <script>` is made of: each changed line attributed to the section of its script.

The scripts share one layout (docstring, imports, Args with the shared fields and then the method's own, PRESETS, the
method section, the train-loop helpers, main), so a diff of two of them should be mostly the papers' content: the
docstrings, the method fields, the paper's defaults of the shared fields, and the method sections. This counts it.

    python bench/script_diff.py                       # every script against kdrl.py
    python bench/script_diff.py --base s2l_po.py --scripts copd.py
"""

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("docstring", "imports", "Args shared", "Args method", "PRESETS", "method", "helpers", "main", "entry")


def sections(path: Path) -> list[str]:
    """The section of each line of a script, from the landmarks every script has."""
    labels, cur, doc_open = [], "docstring", True
    for i, line in enumerate(path.read_text().splitlines()):
        if doc_open and i > 0 and line.rstrip().endswith('"""'):
            labels.append("docstring")
            cur, doc_open = "imports", False
            continue
        if not doc_open:
            if line.startswith("class Args"):
                cur = "Args shared"
            elif cur == "Args shared" and re.match(r"    # --- [A-Z]", line) and not re.match(
                    r"    # --- (run|policy|evaluation|rollouts|optimisation|bookkeeping)\b", line):
                cur = "Args method"
            elif line.startswith("PRESETS"):
                cur = "PRESETS"
            elif line.startswith("# The method"):
                cur = "method"
            elif line.startswith("# Train loop"):
                cur = "helpers"
            elif line.startswith("def main("):
                cur = "main"
            elif line.startswith("if __name__"):
                cur = "entry"
        labels.append(cur)
    return labels


def anatomy(base: Path, other: Path) -> tuple[int, Counter, Counter]:
    """(diff lines in all, changed lines of `base` by section, changed lines of `other` by section)."""
    out = subprocess.run(["diff", str(base), str(other)], capture_output=True, text=True).stdout.splitlines()
    sa, sb, a, b = sections(base), sections(other), Counter(), Counter()
    la = lb = 0
    for line in out:
        m = re.match(r"^(\d+)(?:,\d+)?([acd])(\d+)(?:,\d+)?$", line)
        if m:
            la, lb = int(m.group(1)) + (m.group(2) == "a"), int(m.group(3)) + (m.group(2) == "d")
        elif line.startswith("< "):
            a[sa[la - 1]] += 1
            la += 1
        elif line.startswith("> "):
            b[sb[lb - 1]] += 1
            lb += 1
    return len(out), a, b


def before_main(base: Path, other: Path) -> int:
    """Diff lines of the two files cut at `def main(`: what the papers' declarations alone (docstring, Args, PRESETS,
    method section, helpers) contribute, however well the two mains were aligned."""
    with tempfile.TemporaryDirectory() as tmp:
        cut = []
        for path in (base, other):
            text = path.read_text()
            cut.append(Path(tmp) / path.name)
            cut[-1].write_text(text[:text.index("\ndef main(")])
        return len(subprocess.run(["diff", *map(str, cut)], capture_output=True, text=True).stdout.splitlines())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="kdrl.py")
    p.add_argument("--scripts", nargs="*", default=["codistill_grpo.py", "s2l_po.py", "copd.py", "sparse_to_dense.py"])
    args = p.parse_args()
    base = ROOT / args.base
    print(f"changed lines of `diff {args.base} <script>` by section, as {args.base} lines + script lines")
    print(f"| script | diff lines | {' | '.join(SECTIONS)} | diff markup | diff up to main |")
    print("|---" * (len(SECTIONS) + 4) + "|")
    for s in args.scripts:
        total, a, b = anatomy(base, ROOT / s)
        cells = [f"{a[k]} + {b[k]}" for k in SECTIONS]
        markup = total - sum(a.values()) - sum(b.values())
        print(f"| {s} | {total} | {' | '.join(cells)} | {markup} | {before_main(base, ROOT / s)} |")


if __name__ == "__main__":
    main()
