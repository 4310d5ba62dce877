"""Fuzz tests of the rewards in tasks.py (issue #10; the math checker, issue #27): every checker must return a float in
[0, 1] for any completion, fast and in bounded memory, because an RL policy (a KL = 0 one above all) writes whatever
the reward pays for. math_equal and extract_boxed run on every case too (as 0.0 / 1.0).

The cases run in a child process (this file is also its script: `python tests/test_tasks_fuzz.py GROUP`) under a
hard timeout and an address-space limit, so a hang or a runaway allocation fails the test instead of stalling the
suite or the machine. The child prints one JSON line per checker call; the parent asserts on them. ~5 s on 2 cores.
"""
import json
import random
import resource
import string
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALL_SECONDS = 1.0           # per checker call; the checkers take ~1 ms even on 1 MB inputs, so this is not flaky
GROUP_TIMEOUT = 60           # whole child process: reached only when something hangs
MEMORY_LIMIT = 2 << 30       # address space of the child, bytes: runaway memory raises MemoryError there


def memory_bound(completion: str) -> int:
    """Most extra bytes a call may allocate: a small multiple of the input, plus slack for small objects."""
    return 8 * sys.getsizeof(completion) + (1 << 20)


# ---- the cases ------------------------------------------------------------------------------------------------

SURROGATES = b"\xed\xa0\x80\xed\xbf\xbf".decode("utf-8", "surrogatepass")       # "\ud800\udfff": lone surrogates
ODD = ["\u0663", "\u0662\u0660", "\uff12\uff10", "\u200f", "\u202e", "\u0302", "\x00", "\ufeff", "\u2028",
       "\xa0", SURROGATES, "\U0001d7ce"]    # Arabic-Indic / fullwidth / math digits, RTL marks, combining, NUL, BOM
TOKENS = (list(string.printable) + ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "\\frac{", "{", "}",
                                     "(", ")", " + ", " - ", " * ", " / ", "**", "e999999999", "9" * 60] + ODD)
OPS = ["+", "-", "*", "/", "**", "//", "%", " "]


def label(prefix: str, k: int, s: str) -> str:
    """A unique, printable case name: prefix, index, and the start of the text, escaped to ASCII."""
    return f"{prefix}{k}_{ascii(s[:12])[1:-1]}"


def issue_cases():
    """The exact cases from issue #10."""
    yield "boxed_1e999999999", "\\boxed{1e999999999}"
    yield "boxed_1e10000000", "\\boxed{1e10000000}"
    yield "answer_tags_20000", "<answer>" * 20000


BIG = "9" * 10 ** 6
BOXED = ["1E999999999", "$1e999999999$", "-1e-999999999", "1e999999999/3", "\\frac{1e999999999}{1}", BIG,
         "\\frac{" + "9" * 10 ** 5 + "}{3}", "9" * 30 + "/" + "9" * 30, "1," * 50000 + "1"]
EXPRESSIONS = ["*".join(["9" * 99] * 3), "999999*" * 42 + "999999", "999999/" * 42 + "999999",
               "+".join(f"1/{999999 - i}" for i in range(30)), "(" * 20 + "999999*999999" + ")" * 20, BIG, "9" * 4000,
               "(" * 10 ** 5 + "1" + ")" * 10 ** 5, "(" * 150 + "1" + ")" * 149, "1+" * 149 + "1", "-" * 299 + "1",
               "\u0663 + \u0664", "1\x00", SURROGATES, "50 + 25 + 7 - 3" + "\u0302"]
FLOODS = ["<answer>" * 20000 + "</answer>", "<think>" * 20000, "</answer>" * 20000, "<answer></answer>" * 50000,
          "<think>" + "</think>" * 20000, "<think>" + "x" * 10 ** 6 + "</think>" + " " * 10 ** 6 + "<answer>",
          "<think></think>" + "<answer>" * 20000 + "</answer>", "\\boxed{" * 100000, "\\boxed{" * 100000 + "20}",
          "\\boxed{" + "{" * 10 ** 6, "\\boxed{" + "{" * 10 ** 5 + "}" * 10 ** 5 + "}", "{" * 10 ** 6]


def adversarial_cases():
    """Hand-made worst cases: huge literals, deep nesting, repeated tags, odd Unicode, long inputs."""
    yield from issue_cases()
    for k, s in enumerate(BOXED):
        yield label("boxed", k, s), f"\\boxed{{{s}}}"
    for k, s in enumerate(EXPRESSIONS):
        yield label("answer", k, s), f"<think>x</think><answer>{s}</answer>"
    for k, s in enumerate(FLOODS):
        yield label("tags", k, s), s
    for k, odd in enumerate(ODD):
        yield label("odd", k, odd), f"<think>{odd}</think><answer>{odd}</answer> \\boxed{{{odd}}} \\boxed{{2{odd}0}}"
    rng = random.Random(0)
    yield "random_tokens_1MB", "".join(rng.choices(TOKENS, k=300_000))[:1 << 20]
    yield "random_bytes_1MB", rng.randbytes(1 << 20).decode("utf-8", "surrogateescape")
    yield "random_text_1MB", "".join(rng.choices(string.printable, k=1 << 20))


def mutate(rng: random.Random, s: str) -> str:
    """One random edit: flip, insert or delete characters, swap an operator, repeat a tag, add a huge literal."""
    i = rng.randrange(len(s) + 1)
    kind = rng.randrange(7)
    if kind == 0:
        return s[:i] + rng.choice(TOKENS) + s[i + 1:]                                     # flip
    if kind == 1:
        return s[:i] + "".join(rng.choices(TOKENS, k=rng.randint(1, 5))) + s[i:]          # insert
    if kind == 2:
        return s[:i] + s[i + rng.randint(1, 20):]                                         # delete
    if kind == 3:
        ops = [k for k, c in enumerate(s) if c in "+-*/"]
        j = rng.choice(ops) if ops else i
        return s[:j] + rng.choice(OPS) + s[j + 1:]                                        # swap an operator
    if kind == 4:
        tag = rng.choice(["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "{", "("])
        return s[:i] + tag * rng.choice([1, 2, 100, 5000]) + s[i:]                        # repeated / unclosed tags
    if kind == 5:
        return s[:i] + rng.choice(["9" * rng.randint(7, 5000), "1e999999999", "9" * 31]) + s[i:]   # huge literal
    return s + s                                                                          # duplicate


def mutated_cases(n: int = 1500, seed: int = 0):
    """Reference solutions with 1-5 random edits each."""
    import tasks
    rng = random.Random(seed)
    refs = [p.response for k in tasks.KINDS for p in tasks.make_problems(k, 20, seed)]
    for i in range(n):
        s = rng.choice(refs)
        for _ in range(rng.randint(1, 5)):
            s = mutate(rng, s)
        yield f"mutant_{i}", s


def random_cases(n: int = 300, seed: int = 1):
    """Random token soups from a few characters to ~100 KB."""
    rng = random.Random(seed)
    for i in range(n):
        yield f"random_{i}", "".join(rng.choices(TOKENS, k=rng.choice([1, 10, 100, 1000, 30_000])))


MATH_GOLD = "\\frac{\\sqrt{2}}{2}"
DEEP = 100_000
MATH_ANSWERS = ["2^{2^{2^{99}}}", "10^{999999999}", "2^{99999999}", "9^{9^{9^{9}}}", "(2^{4096})^{4096}",
                "\\sqrt{2}^{999999999}", "10^{-999999999}", "0^{-1}", "(-8)^{1/3}", "\\sqrt{-1}", "\\frac{1}{0}",
                "\\frac{0}{0}", "\\infty - \\infty", "\\infty \\cdot 0", "nan", "NaN", "inf", "-inf", "1e309",
                "\\sqrt[999999999]{2}", "\\sqrt[0]{2}", "9" * 10 ** 6, "0." + "0" * 299 + "1",
                "9" * 300 + "/" + "9" * 300,
                "{" * DEEP + "1" + "}" * DEEP, "{" * DEEP, "}" * DEEP, "\\frac{" * DEEP + "1", "\\frac" * DEEP,
                "\\sqrt{" * DEEP + "2" + "}" * DEEP, "\\sqrt" * DEEP + "2", "(" * DEEP + "1" + ")" * DEEP,
                "-" * DEEP + "1", "2^" * DEEP + "2", "\\left(" * DEEP + "1", "\\left(" * DEEP + "1" + "\\right)" * DEEP,
                "\\text{" * DEEP, "\\text{a}" * DEEP, "1," * DEEP + "1", "(" + "1," * DEEP + "1]", "\\{" * DEEP,
                "x=" * DEEP + "3", "=" * DEEP, "1{,}" * DEEP, "\\!" * DEEP, "(1, \\sqrt{2}]", MATH_GOLD]


def math_cases():
    """Answers built to be expensive (issue #27): huge exponents, 100k-deep nesting, megabyte strings, unbalanced
    braces, division by zero, NaN-like text; each bare (as an answer) and boxed (as a completion)."""
    for k, s in enumerate(MATH_ANSWERS):
        yield label("math", k, s), s
        yield label("mathboxed", k, s), f"so \\boxed{{{s}}}"
    rng = random.Random(2)
    pieces = ["\\frac", "\\sqrt", "{", "}", "(", ")", "[", "]", "^", "-", "+", "\\cdot", "\\pi", "\\infty", ",", "9",
              "1", "0", ".", "\\left", "\\right", "\\text{", "$", "\\%", "=", "x", "\\boxed{", "\\fbox{", " "]
    yield "math_soup_1MB", "".join(rng.choices(pieces, k=300_000))[:1 << 20]
    yield "math_soup_2MB_boxed", "\\boxed{" + "".join(rng.choices(pieces, k=600_000))[:2 << 20]
    for i in range(300):
        yield f"math_random_{i}", "".join(rng.choices(pieces, k=rng.choice([3, 10, 30, 100, 400])))


GROUPS = {"issue": issue_cases, "adversarial": adversarial_cases, "mutated": mutated_cases, "random": random_cases,
          "math": math_cases}


# ---- the child: run every checker on every case of a group ----------------------------------------------------

def checkers():
    """(name, function of a completion) for every reward, on one problem of each kind."""
    import tasks
    cd, ar = tasks.make_problems("countdown", 1, 0)[0], tasks.make_problems("arith", 1, 0)[0]
    mp = tasks.Problem("math", "", MATH_GOLD)
    return [("countdown_reward", lambda c: tasks.countdown_reward(cd, c)),
            ("math_reward", lambda c: tasks.math_reward(ar, c)),
            ("reward/countdown", lambda c: tasks.reward(cd, c)), ("reward/arith", lambda c: tasks.reward(ar, c)),
            ("proxy_reward/countdown", lambda c: tasks.proxy_reward(cd, c)),
            ("proxy_reward/arith", lambda c: tasks.proxy_reward(ar, c)),
            ("reward_math", lambda c: tasks.reward_math(MATH_GOLD, c)), ("reward/math", lambda c: tasks.reward(mp, c)),
            ("proxy_reward/math", lambda c: tasks.proxy_reward(mp, c)),
            ("math_equal", lambda c: float(tasks.math_equal(c, MATH_GOLD))),             # c as the answer
            ("math_equal/interval", lambda c: float(tasks.math_equal("(1, \\sqrt{2}]", c))),
            ("extract_boxed", lambda c: float(tasks.extract_boxed(c) is not None))]


def child(group: str, only: str | None = None):
    """Print {"begin": case} before each case (or just case `only`), one record per checker call, {"done": n}."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    sys.path.insert(0, str(REPO))
    funcs, n = checkers(), 0
    tracemalloc.start()
    for case, completion in GROUPS[group]():
        if only is not None and case != only:
            continue
        print(json.dumps({"begin": case}), flush=True)
        for name, f in funcs:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter()
            try:
                r, error = f(completion), None
            except BaseException as e:                   # noqa: BLE001 - any escape is a failure to report
                r, error = None, f"{type(e).__name__}: {e}"[:300]
            seconds = time.perf_counter() - t0
            extra = tracemalloc.get_traced_memory()[1] - base
            print(json.dumps({"case": case, "checker": name, "reward": r if type(r) is float else repr(r),
                              "is_float": type(r) is float, "seconds": seconds, "extra_bytes": extra,
                              "bound_bytes": memory_bound(completion), "error": error}), flush=True)
            n += 1
    print(json.dumps({"done": n}), flush=True)


# ---- the parent: the tests ------------------------------------------------------------------------------------

def run_group(group: str, only: str | None = None, timeout: float = GROUP_TIMEOUT) -> list[dict]:
    """Run a group (or its case `only`) in a child process; fail on a timeout, a crash, or an unfinished run.
    Returns its records."""
    cmd = [sys.executable, __file__, group] + ([only] if only else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=REPO)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        lines = (e.stdout or b"").decode(errors="replace").splitlines()
        begun = [json.loads(x)["begin"] for x in lines if x.startswith('{"begin"')]
        raise AssertionError(f"group {group!r} timed out after {timeout} s in case {begun[-1:]}") from None
    records = [json.loads(x) for x in out.decode().splitlines()]
    assert rc == 0 and records and "done" in records[-1], f"group {group!r} crashed (rc {rc}): {err.decode()[-2000:]}"
    return [r for r in records if "checker" in r]


def assert_safe(records: list[dict]):
    """Every call returned a float in [0, 1], within CALL_SECONDS, allocating at most memory_bound."""
    bad = [r for r in records if r["error"] or not r["is_float"] or not 0.0 <= r["reward"] <= 1.0
           or r["seconds"] > CALL_SECONDS or r["extra_bytes"] > r["bound_bytes"]]
    assert not bad, f"{len(bad)} unsafe calls, e.g. {bad[:3]}"


def issue_records(case: str) -> list[dict]:
    """Records of one issue case, run alone in a child, checked by assert_safe (each call < CALL_SECONDS)."""
    records = run_group("issue", only=case, timeout=20)
    assert {r["case"] for r in records} == {case}
    assert_safe(records)
    return records


def test_issue_boxed_1e999999999():
    """19 characters that made parse_number build 10^999999999 (did not finish in a minute): refused, scores 0."""
    records = issue_records("boxed_1e999999999")
    assert {r["checker"]: r["reward"] for r in records}["math_reward"] == 0.0


def test_issue_boxed_1e10000000():
    """Took 6 s before: refused (no scientific notation), scores 0."""
    records = issue_records("boxed_1e10000000")
    assert {r["checker"]: r["reward"] for r in records}["math_reward"] == 0.0


def test_issue_20000_unclosed_answer_tags():
    """Took 13 s in the answer-tag regex before: no complete <answer> pair and not well-formed, scores 0."""
    records = issue_records("answer_tags_20000")
    assert {r["checker"]: r["reward"] for r in records}["countdown_reward"] == 0.0


def test_adversarial_inputs():
    """Huge literals, deep nesting, repeated tags, odd Unicode and 1 MB inputs: safe, and huge numbers score 0."""
    records = run_group("adversarial")
    assert_safe(records)
    rewards = {(r["case"], r["checker"]): r["reward"] for r in records}
    assert all(v == 0.0 for (case, checker), v in rewards.items() if checker == "math_reward"
               and case.startswith("boxed")), "huge numbers must not score"


def test_mutated_reference_solutions():
    """1500 reference solutions with random edits, through every checker call."""
    records = run_group("mutated")
    assert_safe(records)
    assert len(records) == 1500 * N_CHECKERS


def test_random_token_soups():
    """300 random mixes of characters, tags, odd Unicode and long digit runs, up to ~100 KB."""
    assert_safe(run_group("random"))


N_CHECKERS = 12


def test_math_adversarial_answers():
    """Huge exponents, 100k-deep \\frac / \\sqrt / braces, 1-2 MB strings, division by zero, NaN-like answers: every
    call is safe, none of them equals the gold, and the gold itself (bare and boxed) still scores: the test sees a
    checker that answers 0.0 to everything."""
    records = run_group("math")
    assert_safe(records)
    assert len({r["checker"] for r in records}) == N_CHECKERS
    got = {(r["case"], r["checker"]): r["reward"] for r in records}
    g, i = MATH_ANSWERS.index(MATH_GOLD), MATH_ANSWERS.index("(1, \\sqrt{2}]")
    hits = {(label("mathboxed", g, MATH_GOLD), "reward_math"), (label("mathboxed", g, MATH_GOLD), "reward/math"),
            (label("math", g, MATH_GOLD), "math_equal"), (label("math", i, MATH_ANSWERS[i]), "math_equal/interval")}
    answers = {label(prefix, k, s) for k, s in enumerate(MATH_ANSWERS) for prefix in ("math", "mathboxed")}
    for (case, checker), r in got.items():
        if case in answers and checker in ("reward_math", "reward/math", "math_equal", "math_equal/interval"):
            assert r == float((case, checker) in hits), (case, checker, r)


if __name__ == "__main__":
    child(*sys.argv[1:3])
