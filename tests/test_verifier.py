"""The verifier: answer extraction, math-verify grading tables, bounded time on pathological output, any thread,
and every benchmark gold answer graded correct against itself."""

import threading
import time

import pytest

import verifiers
from conftest import SHARED_DATA, read_jsonl


@pytest.fixture(scope="module")
def grader():
    g = verifiers.Grader(workers=2, timeout_s=3.0)
    yield g
    g.close()


@pytest.mark.parametrize("text,want", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5 and more", "5"),
    ("\\boxed{unclosed", None),
    ("no answer", None),
    ("\\boxed{}", ""),
])
def test_last_boxed(text, want):
    assert verifiers.last_boxed(text) == want


def test_answer_tag_mode():
    assert verifiers.extract_answer("<think>x</think> <answer> 42 </answer>", "answer_tag") == "42"
    assert verifiers.extract_answer("<answer>\\boxed{7}</answer>", "answer_tag") == "7"
    assert verifiers.extract_answer("\\boxed{7}", "answer_tag") is None
    assert verifiers.tag_format_reward("<think>a</think><answer>b</answer>", ("</think>", "</answer>"), 0.25) == 0.5
    assert verifiers.tag_format_reward("</think></think>", ("</think>", "</answer>"), 0.25) == 0.0


def test_grade_each_routes_every_row_to_its_own_verifier(grader):
    """CoPD's interference world grades one branch on the box and the other on the answer tag: the same completions
    must score by the verifier each row names, whatever the order of the rows."""
    tagged = verifiers.Grader(workers=1, timeout_s=3.0, mode="answer_tag")
    try:
        texts = ["1+2=3. \\boxed{3}", "1+2=3. <answer>3</answer>", "1+2=3. <answer>3</answer>", "x. \\boxed{3}"]
        kinds = ["math", "math", "math_tag", "math_tag"]
        assert verifiers.grade_each({"math": grader, "math_tag": tagged}, kinds, texts, ["3"] * 4) == [1, 0, 1, 0]
    finally:
        tagged.close()


TABLE = [
    # right
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    # wrong
    ("\\boxed{41}", "42", 0.0),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{(1,3)}", "(1,2)", 0.0),
    # equivalent forms
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{\\pi}{4}}", "\\frac{\\pi}{4}", 1.0),
    ("\\boxed{3/4}", "\\frac{3}{4}", 1.0),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", 1.0),
    ("\\boxed{1000}", "1,000", 1.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{ 12 }", "12", 1.0),
    # malformed
    ("\\boxed{42", "42", 0.0),
    ("42", "42", 0.0),
    ("\\boxed{}", "42", 0.0),
    ("\\boxed{\\frac{1}{}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{)(*&^%$}", "3", 0.0),
]


def test_grading_table(grader):
    got = grader([t for t, _, _ in TABLE], [g for _, g, _ in TABLE])
    assert got == [w for _, _, w in TABLE], [(t, g, w, x) for (t, g, w), x in zip(TABLE, got) if w != x]


def test_pathological_output_is_bounded_and_harmless(grader):
    """A tower of exponents (sympy would run for ever in C), a huge answer and deep nesting: each scores 0 within
    the time bound, and the grader keeps working afterwards."""
    cases = ["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{" + "1" * 100_000 + "}",
             "\\boxed{" + "{" * 300 + "1" + "}" * 300 + "}", "\\boxed{10^{10^{10^{10}}}!}"]
    t0 = time.monotonic()
    assert grader(cases, ["3", "3", "3", "3"]) == [0.0] * 4
    assert time.monotonic() - t0 < 2 * 3.0 + 5  # at most two rounds of the 3 s bound on 2 workers, plus slack
    assert grader(["\\boxed{\\frac{2}{4}}"], ["0.5"]) == [1.0]


def test_grader_works_off_the_main_thread(grader):
    out = {}

    def work(i):
        out[i] = grader([f"\\boxed{{\\frac{{{i}}}{{2}}}}", "\\boxed{7}"], [str(i / 2), "8"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out[i] == [1.0, 0.0] for i in range(1, 5))


BENCH_FILES = sorted(SHARED_DATA.glob("*.jsonl")) if SHARED_DATA.exists() else []


@pytest.mark.skipif(not BENCH_FILES, reason=f"benchmark data not found at {SHARED_DATA} (it sits beside a "
                                            "development checkout, not in a user's clone)")
@pytest.mark.parametrize("path", BENCH_FILES, ids=[p.stem for p in BENCH_FILES])
def test_every_benchmark_gold_grades_correct_against_itself(path, grader):
    golds = [str(r["answer"]) for r in read_jsonl(path)]
    got = grader([f"So the answer is $\\boxed{{{g}}}$." for g in golds], golds)
    wrong = [g for g, s in zip(golds, got) if s != 1.0]
    assert not wrong, f"{len(wrong)} of {len(golds)} golds not graded correct: {wrong[:5]}"


def test_a_worker_killed_mid_answer_scores_zero_is_counted_and_grading_goes_on(monkeypatch):
    """A grader worker that dies while it grades (killed from outside, out of memory) costs that answer only: it
    scores 0 and is counted in take_failures(), and a new worker grades the rest."""
    monkeypatch.setattr(verifiers, "_WORKER", (
        "import json, os, signal, sys\n"
        "for line in sys.stdin:\n"
        "    pred, gold, t = json.loads(line)\n"
        "    if pred == '666':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    sys.stdout.write('1\\n' if float(pred) == float(gold) else '0\\n'); sys.stdout.flush()\n"))
    g = verifiers.Grader(workers=1, timeout_s=5.0)
    try:
        # "2.0" vs "2" are not equal strings, so every answer goes to the worker
        scores = g(["\\boxed{2.0}", "\\boxed{666}", "\\boxed{3.0}", "\\boxed{4.5}"], ["2", "1", "3", "4"])
        assert scores == [1.0, 0.0, 1.0, 0.0]
        assert g.take_failures() == 1 and g.take_failures() == 0
        assert g(["\\boxed{5.0}"], ["5"]) == [1.0]  # the replacement worker keeps grading
    finally:
        g.close()
