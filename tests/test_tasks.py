"""tasks.py: problem generators, reference solutions and rule-based rewards (CPU, seconds)."""
import builtins
import random
import re
import time

import pytest

import tasks
from tasks import Problem, countdown_reward, make_problems, math_reward, proxy_reward, reward, task_sft_records


# ---- tasks and checkers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", tasks.KINDS)
def test_generators_deterministic_and_references_score_one(kind):
    a, b = make_problems(kind, 300, seed=1), make_problems(kind, 300, seed=1)
    assert a == b and make_problems(kind, 300, seed=2) != a
    assert len({p.prompt for p in a}) > 290                              # varied
    assert all(reward(p, p.response) == 1.0 for p in a)
    # held-out problems never share a prompt with training ones, SFT stream differs from the pre-training one
    val = make_problems(kind, 50, seed=1, split="val")
    assert not {p.prompt for p in val} & {p.prompt for p in make_problems(kind, 1000, seed=1, split="train")}
    recs = task_sft_records(kind, "train", 20, seed=0)
    assert recs == task_sft_records(kind, "train", 20, seed=0)
    assert {r["prompt"] for r in recs}.isdisjoint(p.prompt for p in tasks.make_problems(kind, 20, 0, "train",
                                                                                      stream="pretrain"))
    assert all(reward(Problem.from_dict(r), r["response"]) == 1.0 for r in recs)


def test_corrupted_answers_score_zero():
    for p in make_problems("countdown", 100, seed=3):
        numbers = p.meta["numbers"]
        bad = p.response.replace(f"<answer>{p.answer}</answer>", f"<answer>{p.answer} + 1</answer>")
        assert countdown_reward(p, bad, format_score=0.0) == 0.0
        assert countdown_reward(p, bad) == 0.1                           # well-formed but wrong: format score
        assert countdown_reward(p, bad.replace("<think>", "")) == 0.0    # malformed and wrong
        assert countdown_reward(p, f"<answer>{p.answer}</answer>") == 1.0  # correctness needs only the answer
        wrong_nums = p.answer.replace(str(numbers[0]), str(numbers[0] + 100), 1)
        assert countdown_reward(p, f"<answer>{wrong_nums}</answer>") == 0.0
    for p in make_problems("arith", 100, seed=3):
        ans = int(p.answer)
        assert math_reward(p, p.response.replace(f"\\boxed{{{ans}}}", f"\\boxed{{{ans + 1}}}")) == 0.0
        assert math_reward(p, p.response.replace("\\boxed", "")) == 0.0
        assert math_reward(p, p.response + f" Wait, \\boxed{{{ans - 1}}}") == 0.0    # the last box counts


def test_countdown_checker_rejects_cheats(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the checker must not eval/exec")
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    p = Problem("countdown", "", "50 + 25 + 7 - 3", {"numbers": [3, 7, 25, 50], "target": 79})
    q = Problem("countdown", "", "40 + 10 * (3 - 2)", {"numbers": [2, 3, 10, 40], "target": 50})
    ok = lambda prob, e: countdown_reward(prob, f"<answer>{e}</answer>", format_score=0.0)  # noqa: E731
    assert ok(p, "50 + 25 + 7 - 3") == 1.0 and ok(p, "(50 + 25) + (7 - 3)") == 1.0
    assert ok(q, "40 + 10 * (3 - 2)") == 1.0 and ok(q, "40 / 2 * 3 - 10") == 1.0   # fractions are exact
    for cheat in ["50 + 25 + 7 - 3 + 3 - 3",             # 3 reused
                  "50 + 29",                             # unlisted number
                  "50 + 25 + 7 - 3 + 0",                 # unlisted 0
                  "__import__('os').system('true')",     # code
                  "(lambda: 79)()", "79", "50 + 25 + 7 - 3.0", "50 + 25 + 7 + -3 + 0", "2**3 + 71",
                  "50 + 25 + 7 - 3; 1", "50 + 25 + (7 - 3) / 0", "((" * 200 + "1" + "))" * 200, ""]:
        assert ok(p, cheat) == 0.0, cheat
    assert ok(q, "40 + 10") == 0.0                       # numbers missing (each exactly once)
    assert countdown_reward(p, "50 + 25 + 7 - 3") == 0.0   # no <answer> tag


def test_math_reward_numeric_compare():
    p = Problem("arith", "", "20", {})
    for good in ["\\boxed{20}", "so \\boxed{ 20 }.", "\\boxed{20.0}", "\\boxed{\\frac{40}{2}}", "\\boxed{$20$}"]:
        assert math_reward(p, good) == 1.0, good
    for bad in ["20", "\\boxed{21}", "\\boxed{20} then \\boxed{3}", "\\boxed{twenty}", "\\boxed{20"]:
        assert math_reward(p, bad) == 0.0, bad
    with pytest.raises(ValueError):
        reward(Problem("chess", "", "", {}), "")


def test_math_number_formats():
    """The formats a \boxed{} answer may use, and what is refused (tasks.py, "Rewards")."""
    p = Problem("arith", "", "1234", {})
    for good in ["1234", "+1234", "1,234", "1\\,234", "1{,}234", "$1,234$", "\\$1234", "1234.0", " 1 234 .",
                 "1234.", "01234", "\\frac{2468}{2}", "\\dfrac{2468}{2}", "\\tfrac{1234}{1}", "2468/2",
                 "\\frac{123.4}{0.1}", "0" * 26 + "1234"]:                              # 30 digits: the most
        assert math_reward(p, f"so \\boxed{{{good}}}") == 1.0, good
    for bad in ["1234e0", "1.234e3", "1.234E3", "12,34", "1,2340", "\u0661\u0662\u0663\u0664",   # Arabic-Indic
                "\uff11\uff12\uff13\uff14", "1234 apples", "0x4d2", "1_234", "2468/2/1", "\\frac{2468}{2",
                "\\frac{2468}{0}", "-1234", "1234%", "inf", "", "0" * 27 + "1234", " " * 100 + "1234"]:
        assert math_reward(p, f"so \\boxed{{{bad}}}") == 0.0, bad
    q = Problem("arith", "", "0.75", {})
    for good in ["\\frac{3}{4}", "3/4", ".75", "0.750", "-\\frac{-3}{4}"]:
        assert math_reward(q, f"\\boxed{{{good}}}") == 1.0, good
    assert math_reward(q, "\\boxed{-\\frac{3}{4}}") == 0.0
    assert math_reward(p, "\\boxed{" * 100_000 + "1234}") == 1.0                  # the last box counts
    assert math_reward(p, "\\boxed{1234}" + "\\boxed{" + "{" * 10 ** 6) == 0.0    # last box never closes


def test_countdown_bounds():
    """Literal size, nesting and characters are bounded; the worst expressions within the bounds are fast."""
    p = Problem("countdown", "", "50 + 25 + 7 - 3", {"numbers": [3, 7, 25, 50], "target": 79})
    ok = lambda e: countdown_reward(p, f"<answer>{e}</answer>", format_score=0.0)  # noqa: E731
    assert ok("(" * 20 + "50 + 25 + 7 - 3" + ")" * 20) == 1.0                   # MAX_NESTING
    assert ok("(" * 21 + "50 + 25 + 7 - 3" + ")" * 21) == 0.0
    assert ok("(50 +\n25 +\t7 - 3)") == 1.0 and ok("50 + 25 + 7 -" + " " * 286 + "3") == 1.0   # 300 characters
    assert ok("50 + 25 + 7 -" + " " * 287 + "3") == 0.0                                       # MAX_EXPR_CHARS
    for cheat in ["\u0665\u0660 + 25 + 7 - 3", "50 + 25 + 7 - 3\u0302", "50 + 25 + 7 - 3\x00", "50 + 25 + 7 - 3\ud800",
                  "50 + 25 + 7 - 0003", "1_0 + 25 + 7 - 3"]:
        assert ok(cheat) == 0.0, repr(cheat)
    big = Problem("countdown", "", "999999 + 1", {"numbers": [1, 999999], "target": 1000000})
    assert countdown_reward(big, "<answer>999999 + 1</answer>") == 1.0                     # 6-digit literals
    assert tasks.safe_arith("1000000 + 1") is None                                         # 7 digits: refused
    worst = ["999999*" * 42 + "999999", "999999/" * 42 + "999999", "+".join(f"1/{999999 - i}" for i in range(33)),
             "(999999 + 1/999998) * " * 13 + "1", "1+" * 149 + "1", "(" * 20 + "1" + ")" * 20 + "*1" * 129]
    for e in worst:
        assert len(e) <= tasks.MAX_EXPR_CHARS
        t0 = time.perf_counter()
        assert tasks.safe_arith(e) is not None and ok(e) == 0.0
        assert time.perf_counter() - t0 < 1.0, e                    # ~1 ms: Fractions stay under ~10^300


OLD_THINK_FORMAT = re.compile(r"<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?answer>).)*"
                              r"</answer>", flags=re.DOTALL)         # the regexes the linear scans replaced


def old_last_tag(text, tag):
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def test_linear_scans_match_the_regexes():
    """last_tag and well_formed agree with the (quadratic-time) regexes on random short texts."""
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "<", ">", "/", "<think", "answer>", "</", " ", "\n",
              "\u2028", "\x1c", "\xa0", "\u200b", "a", "1 + 2"]
    space = [" ", "\n", "\t", "\u2028", "\x1c", "\xa0", "\u200b", ""]
    counts = {True: 0, False: 0}
    for _ in range(5000):
        r = lambda k: "".join(rng.choices(pieces, k=rng.randint(0, k)))  # noqa: E731
        if rng.random() < 0.3:
            text = r(12)
        else:                                   # near the well-formed shape, with parts dropped or garbled
            parts = [rng.choice(space), "<think>", r(3), "</think>", rng.choice(space), "<answer>", r(3), "</answer>",
                     rng.choice(space)]
            text = "".join(x if rng.random() > 0.07 else r(2) for x in parts)
        expected = OLD_THINK_FORMAT.fullmatch(text.strip()) is not None
        assert tasks.well_formed(text) == expected, repr(text)
        assert tasks.last_tag(text, "answer") == old_last_tag(text, "answer"), repr(text)
        assert tasks.last_tag(text, "think") == old_last_tag(text, "think"), repr(text)
        counts[expected] += 1
    assert min(counts.values()) > 500, counts                    # both outcomes well covered


@pytest.mark.parametrize("kind", tasks.KINDS)
def test_proxy_reward_is_hackable(kind):
    """The proxy pays reference solutions and degenerate digit streams alike; the task reward tells them apart."""
    assert tasks.REWARDS["task"] is reward and tasks.REWARDS["proxy"] is proxy_reward
    for p in make_problems(kind, 100, seed=0):
        assert reward(p, p.response) == 1.0 and proxy_reward(p, p.response) >= 0.75
        hack = {"countdown": "</answer><answer></think><think>", "arith": "answer \\boxed{}"}[kind] + "7" * 64
        assert proxy_reward(p, hack) == 1.0 and reward(p, hack) == 0.0
        assert proxy_reward(p, "7" * 10 ** 6) == 0.5 and proxy_reward(p, "") == 0.0
    with pytest.raises(ValueError):
        proxy_reward(Problem("chess", "", "", {}), "")
