"""mathcheck.py: the MATH-style answer checker behind tasks.py's kind "math" (issue #27). CPU, < 1 s.

The table below is written from the graders' conventions (the MATH normaliser, PRM800K's grader) and from the choices
mathcheck.py documents where they differ; each row says why its answer is what it is. Adversarial inputs (huge
exponents, deep nesting, megabyte strings) run in tests/test_tasks_fuzz.py, in a child under time and memory limits.
"""
import builtins

import pytest

import mathcheck
import tasks
from tasks import Problem, extract_boxed, math_equal, reward_math

EQUAL = [
    ("\u22123", "-3"),                                     # U+2212 MINUS SIGN, as text copied from a page writes it
    # LaTeX spellings of the same fraction
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),                   # \dfrac, \tfrac -> \frac
    ("\\tfrac{1}{2}", "\\frac{1}{2}"),
    ("\\frac12", "\\frac{1}{2}"),                        # one-character arguments, as LaTeX reads them
    ("\\frac1{72}", "\\frac{1}{72}"),
    ("\\frac{1}2", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    (".5", "0.5"),
    ("1/2", "\\frac{1}{2}"),
    ("\\frac{2}{4}", "\\frac{1}{2}"),                    # by value (PRM800K refuses unreduced a/b: documented)
    ("-\\frac{1}{2}", "\\frac{-1}{2}"),
    ("-0.5", "-\\frac12"),
    ("\\frac{3}{2}", "1.5"),
    ("1\\frac{1}{2}", "\\frac{3}{2}"),                   # a mixed number is a sum
    ("33\\frac{1}{3}", "\\frac{100}{3}"),
    ("2\\frac{\\pi}{3}", "\\frac{2\\pi}{3}"),                # not a mixed number: a product
    ("\\frac{1}{2}", "0.50"),
    # numbers
    ("3.0", "3"),
    ("3.", "3"),                                          # a trailing period ends the sentence
    ("003", "3"),
    ("+5", "5"),
    ("-0", "0"),
    ("-3", "-3.0"),
    ("1.50", "1.5"),
    ("0.1 + 0.2", "0.3"),                                 # exact: no 0.30000000000000004
    ("(3)", "3"),
    ("{3}", "3"),
    # thousands separators, spaces
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("1\\,000", "1000"),
    ("1,000,000", "10^6"),
    ("12 345", "12345"),
    ("1\\!000", "1000"),
    ("x = 1,000", "1000"),
    ("\\$1,000.50", "1000.5"),
    ("(1{,}000, 2)", "(1000, 2)"),                       # {,} between digits is a thousands comma anywhere
    ("(0, 100)", "(0.0, 100)"),                          # but in an interval "0,100" is two endpoints
    ("[0, 100]", "[0, 10^2]"),
    # units, currency, percent, degrees
    ("5\\text{ cm}", "5"),
    ("5 \\mbox{ inches}", "5"),
    ("12\\text{ cm}^2", "12"),                            # the unit's exponent goes with it
    ("10\\text{ meters}^{2}", "10"),
    ("5\\text{ dollars}", "5"),
    ("\\$18.90", "18.9"),
    ("$18.90$", "18.9"),
    ("\\$5", "5"),
    ("50\\%", "50"),                                      # the MATH normaliser strips \%
    ("50%", "50"),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("30\u00b0", "30"),
    ("\\text{Evelyn}", "Evelyn"),                         # a whole answer in \text{} is its content
    ("\\text{(A)}", "(A)"),
    ("\\textbf{(C)}", "(C)"),
    ("5\\text{cm}", "5"),                                # a group after a number is a unit
    ("\\text{A}, \\text{C}", "C, A"),                    # other groups are their content
    # a single variable on the left of "="
    ("x = 3", "3"),
    ("x=3", "3"),
    ("k = -2", "-2"),
    ("3", "y = 3"),
    ("x = \\frac{1}{2}", "0.5"),
    # \left / \right, \displaystyle
    ("\\left(1, 2\\right)", "(1,2)"),
    ("\\left[ 0, \\frac12 \\right]", "[0, 0.5]"),
    ("\\displaystyle\\frac{1}{2}", "0.5"),
    # expressions by value: sqrt, pi, powers, implicit multiplication
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("2 \\sqrt 3", "\\sqrt{12}"),
    ("\\sqrt{16}", "4"),                                  # a perfect square is exact
    ("\\sqrt{\\frac{9}{4}}", "1.5"),
    ("\\sqrt[3]{8}", "2"),
    ("\\sqrt[3]{10^{330}}", "10^{110}"),                  # exact integer root past a float's range
    ("\\sqrt{2}\\cdot\\sqrt{2}", "2"),                   # float 2.0000000000000004, within the tolerance
    ("2^{1/2}", "\\sqrt{2}"),
    ("2^{10}", "1024"),
    ("2^10", "1024"),                                     # read as 2^{10}, as sympy-based graders do
    ("10^{-2}", "0.01"),
    ("2^{-1}", "0.5"),
    ("(-2)^2", "4"),
    ("-2^2", "-4"),                                       # the power binds tighter than the minus
    ("2\\pi", "\\pi \\cdot 2"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("3.14159265358979", "\\pi"),                         # 1e-15 off: within REL_TOL
    ("3 \\cdot 4", "12"),
    ("3 \\times 4", "12"),
    ("3(4)", "12"),
    ("12 \\div 4", "3"),
    ("2^{100}", "1267650600228229401496703205376"),       # exact, 31 digits
    # intervals and tuples: brackets and order matter
    ("(1, 2]", "(1,2]"),
    ("(1.0, 2)", "(1, 2)"),
    ("[-1, \\infty)", "[-1,\\infty)"),
    ("(-\\infty, 0.5)", "(-\\infty, \\frac{1}{2})"),
    ("\\left( \\frac{1}{2}, -3 \\right)", "(0.5,-3)"),
    ("(2, \\sqrt{4})", "(2, 2)"),
    # sets and bare lists ("all solutions"): any order
    ("1, -2", "-2, 1"),
    ("2,3,5", "5, 3, 2"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("\\frac12, 3", "3, 0.5"),
    ("(1, 2), (3, 4)", "(3, 4), (1, 2)"),
    ("3 \\text{ or } 4", "4, 3"),                       # "or" / "and" in \text{} separate answers
    ("1\\text{ and }2", "1, 2"),
    # infinity
    ("\\infty", "\\infty"),
    ("-\\infty", "-\\infty"),
    # long but equal strings
    ("x^2 + 2x + 1", "x^2+2x+1"),                        # spaces only: no evaluation needed
]

NOT_EQUAL = [
    ("\u22123", "3"),
    ("\\frac{1}{3}", "0.33"),                             # exact rationals: no rounding accepted
    ("\\frac{1}{3}", "0.333333"),                         # (math-verify rounds to 6 places and accepts it)
    ("\\frac{1}{2}", "0.5000001"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("\\frac{1}{2}", "-\\frac{1}{2}"),
    ("3", "-3"),
    ("-2^2", "4"),
    ("2\\frac{\\pi}{3}", "2 + \\frac{\\pi}{3}"),
    ("1.5\\frac{1}{2}", "2"),                             # only an integer starts a mixed number: 0.75 here
    ("2^{-1}", "-2"),
    ("2^{10}", "1000"),
    ("2^{100}", "2^{100}+1"),                             # exact: 1 in 10^30 still counts
    ("10^{6}", "1,000,001"),
    ("1,000", "1"),
    ("1{,}000", "1"),
    ("(1, 100)", "1100"),                                 # an interval, not the number 1,100
    ("(-5, 100)", "-5100"),
    ("1, 234", "1234"),                                   # a list: a comma and a space
    ("\\text{A}, \\text{B}", "\\text{C}, \\text{D}"),    # the letters are the answer, not units
    ("\\text{A}, \\text{B}", ","),
    ("x = 3", "4"),
    ("x = 3", "y = 4"),
    ("x=3", "x"),
    ("\\sqrt{2}", "1.414"),                               # a rounded irrational is not the irrational
    ("\\sqrt{2}", "1.414214"),
    ("\\pi", "3.14"),
    ("\\pi", "3.1415926"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt{3}}{2}"),
    ("2\\sqrt{3}", "\\sqrt{6}"),
    ("50\\%", "0.5"),                                     # \% is stripped, not read as /100 (math-verify reads it)
    ("5\\text{ cm}", "6"),
    ("3 \\text{ or } 4", "34"),                         # not a unit: the "or" keeps the answers apart
    ("\\text{(A)}", "(B)"),
    ("A", "B"),
    ("(1,2)", "[1,2]"),                                   # interval types differ
    ("(1,2)", "(1,2]"),
    ("[0,1]", "[0, 1)"),
    ("[-1, \\infty)", "(-1, \\infty)"),
    ("(1,2)", "(2,1)"),                                   # tuples are ordered
    ("(0, 1)", "(0, 1, 2)"),
    ("1, 2", "(1, 2)"),                                   # a list is not a tuple
    ("\\{1, 2\\}", "(1, 2)"),
    ("1, 2", "1, 2, 3"),
    ("1,2", "1,3"),
    ("1, 1, 2", "1, 2, 2"),                               # as multisets
    ("(1, 2), (3, 4)", "(2, 1), (3, 4)"),
    ("\\infty", "-\\infty"),
    ("\\frac{1}{0}", "\\infty"),                          # division by zero is not a number
    ("\\sqrt{-1}", "i"),                                  # real roots only
    ("\\sqrt{-4}", "2"),
    ("10^{-5000}", "0"),                                  # a float underflow is not 0
    ("2^{-5000}", "0"),
    ("\\pi \\cdot 10^{-400}", "0"),
    ("3.5.2", "0.7"),                                     # not 3.5 times .2
    ("1e3", "1000"),                                      # no scientific notation
    ("x^2-1", "(x-1)(x+1)"),                              # no symbolic algebra
    ("x + 1", "1 + x"),                                   # variables: compared as strings
    ("0.5", "\\frac{1}{2}x"),
    ("10^{999999999}", "10^{999999998}"),                 # too big to evaluate: compared as strings
    ("3", ""),                                            # an empty answer matches nothing
    ("", "3"),
    ("", ""),
    ("\\boxed{3}", "4"),
]


def test_table_is_large_and_balanced():
    assert len(EQUAL) + len(NOT_EQUAL) >= 100 and min(len(EQUAL), len(NOT_EQUAL)) >= 40
    assert len(set(EQUAL + NOT_EQUAL)) == len(EQUAL) + len(NOT_EQUAL)          # no row twice


@pytest.mark.parametrize("pred,gold", EQUAL)
def test_equal(pred, gold):
    assert math_equal(pred, gold) is True
    assert math_equal(gold, pred) is True                 # symmetric on every row


@pytest.mark.parametrize("pred,gold", NOT_EQUAL)
def test_not_equal(pred, gold):
    assert math_equal(pred, gold) is False
    assert math_equal(gold, pred) is False


def test_no_eval(monkeypatch):
    """The evaluator is our parser: eval and exec are never called."""
    def forbidden(*a, **k):
        raise AssertionError("the checker must not eval/exec")
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert math_equal("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2") and not math_equal("__import__('os')", "0")


def test_bounds_give_false_not_errors():
    """Past the bounds an answer is compared as a string: no RecursionError, no huge integer, no float overflow."""
    assert math_equal("(" * 5 + "1" + ")" * 5, "1")
    assert not math_equal("(" * 1000 + "1" + ")" * 1000, "1")                       # deeper than MAX_DEPTH
    assert math_equal("(" * 1000 + "1" + ")" * 1000, " (" * 1000 + "1" + ")" * 1000)  # same string
    assert not math_equal("-" * 1000 + "1", "1")
    assert mathcheck.value("2^{99999999}") is None and mathcheck.value("2^{2^{2^{99}}}") is None
    assert mathcheck.value("10^{300}") == 10 ** 300                                  # exact below MAX_BITS
    assert mathcheck.value("2^{2000}") == 2 ** 2000
    assert mathcheck.value("\\frac{1}{0}") is None and mathcheck.value("0^{-1}") is None
    assert mathcheck.value("(-8)^{1/3}") is None                                     # no complex powers
    long = "1+" * 200 + "1"                                                          # 401 characters
    assert not math_equal(long, "201") and math_equal(long, long.replace("+", " + "))


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                                       # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\fbox{7}", "7"),
    ("\\boxed{1} then \\boxed{2}", "2"),                                             # the last box
    ("\\boxed{1} then \\fbox{2}", "2"),
    ("\\fbox{1} then \\boxed{2}", "2"),
    ("$\\boxed 5$", "5"),                                                            # \boxed followed by a token
    ("\\boxed  {x}", "{x}"),
    ("the answer is \\boxed{3", None),                                               # unbalanced
    ("\\boxed{1} and \\boxed{", None),                                               # the last box never closes
    ("no box here", None),
    ("", None),
    ("\\boxed", None),
    ("\\boxed{}", ""),
    ("\\boxed{" + "x" * 20_000 + "}", None),                                         # over MAX_BOXED_CHARS
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_reward_math_and_the_math_kind():
    assert reward_math("\\frac{\\sqrt{2}}{2}", "So the answer is $\\boxed{\\sqrt{2}/2}$.") == 1.0
    assert reward_math("3", "x = \\boxed{x = 3}") == 1.0
    assert reward_math("3", "\\boxed{3} no, \\boxed{4}") == 0.0                    # the last box counts
    assert reward_math("3", "3") == 0.0                                             # no box: 0
    assert reward_math("3", "\\boxed{3") == 0.0
    assert reward_math("(1, 2]", "\\boxed{\\left(1, 2\\right]}") == 1.0
    p = Problem("math", "What is 2^{10}?\n", "1024")
    assert tasks.reward(p, "\\boxed{2^{10}}") == 1.0 and tasks.reward(p, "\\boxed{1000}") == 0.0
    assert tasks.score(p, "\\boxed{1024}") == 1.0
    assert tasks.proxy_reward(p, "\\boxed{} answer " + "7" * 16) == 1.0
    assert "math" not in tasks.KINDS and "math" in tasks.CHECKERS                   # checked, not generated
    with pytest.raises(ValueError, match="'math'"):                                 # the message lists it
        tasks.reward(Problem("chess", "", ""), "")


def test_arith_task_unchanged():
    """The arith checker keeps its own number rules; the math checker accepts every arith reference too."""
    for p in tasks.make_problems("arith", 50, seed=0):
        assert tasks.reward(p, p.response) == 1.0
        assert reward_math(p.answer, p.response) == 1.0
