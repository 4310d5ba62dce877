"""tasks.py: problem generators, reference solutions and rule-based rewards (CPU, seconds)."""
import builtins

import pytest

import tasks
from tasks import Problem, countdown_reward, make_problems, math_reward, reward, task_sft_records


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
