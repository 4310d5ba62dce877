"""A MATH-style answer checker: the last \\boxed{} of a completion against a reference answer (tasks.py's kind "math").

The paper's headline RL and search results are on MATH-500 and GSM8K, graded 0/1 on the final \\boxed{} answer.
Three functions, re-exported by tasks.py:
  - `extract_boxed(text)`: the content of the last \\boxed{...} or \\fbox{...} (or "\\boxed 5"), or None;
  - `math_equal(pred, gold)`: are two answers the same, under the MATH / PRM800K graders' conventions;
  - `reward_math(gold, completion)`: 1.0 if the completion's last box is math_equal to gold, else 0.0.

How math_equal decides, in order (docs/rl-and-search.md, "Checking math answers", lists the conventions and what it
does not do):
  1. Both answers are normalised as strings (`normalize`: the MATH normaliser's rules: \\dfrac -> \\frac, \\left /
     \\right, units in \\text{}, $, \\%, degrees, spaces, thousands separators, "x = 3" -> "3"). Equal strings: equal.
  2. An answer in brackets with top-level commas is an interval or tuple: same brackets, same length, equal element
     by element. \\{...\\} and a bare comma list ("1, -2": all solutions) are sets: equal in any order.
  3. Otherwise each side is evaluated (`value`): our own recursive-descent parser over +, -, \\cdot, \\times, /,
     \\div, ^, \\frac, \\sqrt, \\pi, parentheses and implicit multiplication (2\\sqrt{3}), never eval. Exact Fractions
     where the value is rational; floats (compared with relative tolerance REL_TOL) once a \\sqrt of a non-square or
     \\pi appears. No letters other than \\pi: an answer with a variable is compared as a string only.

Cost is bounded on any input: answers longer than MAX_ANSWER_CHARS are compared as normalised strings only, the
parser gives up past MAX_DEPTH nested groups (no RecursionError), exact powers are computed only while the result
stays under MAX_BITS bits (2^{99999999} is never built; beyond it a float, which overflows to "not a number"), and
every normalising pass is a linear scan or a regex without nested quantifiers. Bad input never raises: an answer
that cannot be evaluated is compared as a string.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_BOXED_CHARS = 10_000      # longest \boxed{} content read: a MATH answer is < 200 characters
MAX_ANSWER_CHARS = 300        # longer answers are compared as normalised strings only
MAX_DEPTH = 40                # nested groups / operators the parser follows; deeper input is "not a number"
MAX_BITS = 4096               # largest exact numerator / denominator (~1233 digits); beyond it floats
MAX_TEXT_GROUPS = 20          # \text{} groups strip_text drops; more is not an answer (and costs a Python loop)
REL_TOL = 1e-9                # floats (sqrt, pi) are ~1e-15 off; a 6-digit rounding of sqrt(2) is not sqrt(2)

BRACE = re.compile(r"[{}]")
BOXED_TOKEN = re.compile(r" +([^\s$]{1,100})")                # "\boxed 5": one token, up to a space or "$"


# ----------------------------------------------------------------------------------------------------------------
# The boxed answer

def brace_end(text: str, begin: int, limit: int) -> int | None:
    """Index of the '}' closing the group whose content starts at `begin` (its '{' just before), or None if it does
    not close within `limit` characters. Jumps from brace to brace with a regex, so plain text costs no Python loop."""
    depth = 1
    for m in BRACE.finditer(text, begin, min(len(text), begin + limit + 1)):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return m.start()
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} in text (nested braces balanced), or the one token after
    "\\boxed " ("$\\boxed 5$" -> "5": later copies of MATH's last_boxed_only_string, e.g. verl's, take the text
    after the last "\\boxed " up to a "$"; we take one token, up to a space or "$"). None if there is no box, the
    last one never closes, or its content is longer than MAX_BOXED_CHARS (cost: O(MAX_BOXED_CHARS) after two rfind
    calls, whatever the length of text). The last box wins whichever command it uses (the original MATH code looks
    for \\fbox only when there is no \\boxed at all)."""
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    begin = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith("{", begin):
        end = brace_end(text, begin + 1, MAX_BOXED_CHARS)
        return text[begin + 1:end] if end is not None else None
    m = BOXED_TOKEN.match(text, begin)
    return m.group(1) if m else None


def reward_math(gold: str, completion: str) -> float:
    """1.0 if the completion's last boxed answer is math_equal to gold, else 0.0 (no box: 0.0)."""
    boxed = extract_boxed(completion)
    return 1.0 if boxed is not None and math_equal(boxed, gold) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Normalising an answer as a string (the MATH normaliser's rules, our code)

OR_AND = re.compile(r"\\(?:text|mbox)\{\s*(?:or|and)\s*\}")     # "3 \text{ or } 4" -> "3, 4", not units
TEXT = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm)\s*\{")
THOUSANDS = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?")  # a whole answer "1,000": "1000"
BRACED_COMMA = re.compile(r"(?<=[0-9])\{,\}(?=[0-9]{3}(?![0-9]))")    # "1{,}000" anywhere: LaTeX's thousands comma
LIST_COMMA = re.compile(r",\s")                                        # "1, 234" is a list, never a thousands comma
ASSIGNMENT = re.compile(r"[A-Za-z]=(?!=)")                    # "x=3" (spaces already gone) -> "3"
WHITESPACE = re.compile(r"\s+")
UNIT_POWER = re.compile(r"\s*\^\s*(?:[0-9]|\{[0-9]\})")            # the "^2" of "\text{ cm}^2"
REPLACE = [("\n", ""), ("\\!", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
           ("\\displaystyle", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\u00b0", ""), ("\\$", ""), ("$", ""),
           ("\\%", ""), ("%", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""), ("~", ""),
           ("\u2212", "-")]                                  # U+2212, the minus sign a model may copy from text


def strip_text(s: str) -> str:
    """The whole answer in one \\text{...} (or \\mbox, \\textbf, \\mathrm) -> its content ("\\text{(A)}" -> "(A)");
    otherwise a group that is a unit is dropped with an exponent right after it ("5\\text{ cm}^2" -> "5"): one whose
    content starts with a space (the MATH normaliser's rule) or that follows a number or a closing bracket; any
    other group is its content ("\\text{A}, \\text{C}" -> "A, C", not ","). Up to MAX_TEXT_GROUPS groups of up to MAX_BOXED_CHARS characters (the rest stay as they are: bounded work on a
    megabyte of \\text{a}\\text{a}... or of \\text{{{{...)."""
    m = TEXT.match(s)
    if m and brace_end(s, m.end(), MAX_BOXED_CHARS) == len(s) - 1:
        return s[m.end():-1]
    out, pos = [], 0
    for k, m in enumerate(TEXT.finditer(s)):
        if k == MAX_TEXT_GROUPS:
            break
        if m.start() < pos:                   # inside a group already dropped
            continue
        end = brace_end(s, m.end(), MAX_BOXED_CHARS)       # a longer group is not a unit: left as it is
        if end is None:
            break
        out.append(s[pos:m.start()])
        content = s[m.end():end]
        before = s[max(0, m.start() - 20):m.start()].rstrip()           # bounded look back
        if content[:1].isspace() or before[-1:] in tuple("0123456789)]}."):
            unit_power = UNIT_POWER.match(s, end + 1)
            pos = unit_power.end() if unit_power else end + 1
        else:
            out.append(content)
            pos = end + 1
    return "".join(out) + s[pos:]


def normalize(s: str) -> str:
    """An answer as a canonical string: the replacements in REPLACE, "\\text{ or }" / "\\text{ and }" as commas,
    \\text groups (strip_text), whitespace,
    one trailing ".", a single variable on the left of one "=" ("x = 3" -> "3"), and thousands separators: "{,}"
    between digits anywhere, a plain comma only in an answer that is one number written without spaces after its
    commas ("1,000" -> "1000"; "(1, 100)", "[0,100]" and "1, 234" keep theirs: they are an interval and a list)."""
    s = s.strip()
    for old, new in REPLACE:
        s = s.replace(old, new)
    s = BRACED_COMMA.sub("", s).replace("{,}", ",")
    s = strip_text(OR_AND.sub(",", s))
    listed = LIST_COMMA.search(s)
    s = WHITESPACE.sub("", s)                                 # one new string (not split/join's list of words)
    if s.endswith(".") and not s.endswith("\\."):
        s = s[:-1]
    if s.count("=") == 1 and ASSIGNMENT.match(s):
        s = s[2:]
    if not listed and THOUSANDS.fullmatch(s):               # only a whole number: "(1, 100)" keeps its comma
        s = s.replace(",", "")
    return s


# ----------------------------------------------------------------------------------------------------------------
# Evaluating an answer: a recursive-descent parser over a small LaTeX grammar, exact where it can be

class NotANumber(Exception):
    """The text is not an expression this parser evaluates (or its value is not a finite real number)."""


def checked(v, nonzero: bool = False):
    """v if it is a Fraction of at most MAX_BITS bits or a finite float; a bigger Fraction becomes a float.
    nonzero: the exact result cannot be 0 (a product of nonzero factors...), so a float 0.0 is an underflow, "not a
    number" (10^{-5000} is not 0)."""
    if isinstance(v, Fraction):
        if max(v.numerator.bit_length(), v.denominator.bit_length()) <= MAX_BITS:
            return v
        nonzero = nonzero or v != 0
        v = float(v)                                        # OverflowError past ~1e308: caught by value()
    if not math.isfinite(v):
        raise NotANumber("not finite")
    if nonzero and v == 0:
        raise NotANumber("underflow")
    return v


def power(base, exp):
    """base^exp: exact for a rational base and an integer exponent while the result fits MAX_BITS; else a float."""
    if isinstance(base, Fraction) and isinstance(exp, Fraction) and exp.denominator == 1:
        size = max(base.numerator.bit_length(), base.denominator.bit_length())
        if abs(exp) * size <= MAX_BITS:                     # estimated before computing: 2^{99999999} never is
            if base == 0 and exp < 0:
                raise NotANumber("0 to a negative power")
            return base ** int(exp)
    if base < 0 and not (isinstance(exp, Fraction) and exp.denominator == 1):
        raise NotANumber("negative base, fractional exponent")
    return math.pow(float(base), float(exp))                # OverflowError when huge: caught by value()


def root(x, n: int = 2):
    """The n-th root of x >= 0 (real roots only: \\sqrt{-1} is not a number here): exact for perfect powers."""
    if x < 0:
        raise NotANumber("root of a negative number")
    if isinstance(x, Fraction):
        num, den = (int_root(x.numerator, n), int_root(x.denominator, n))
        if num ** n == x.numerator and den ** n == x.denominator:
            return Fraction(num, den)
    return float(x) ** (1 / n)                              # OverflowError past ~1e308: caught by value()


def int_root(k: int, n: int) -> int:
    """floor(k ** (1/n)) for k >= 0, exactly (integer Newton steps: no float, so \\sqrt[3]{10^{330}} is 10^{110});
    k has at most MAX_BITS bits and n <= 64, so a few dozen steps."""
    if n == 2 or k < 2:
        return math.isqrt(k)
    x = 1 << -(-k.bit_length() // n)                        # >= the root
    while True:
        y = ((n - 1) * x + k // x ** (n - 1)) // n
        if y >= x:
            return x
        x = y


NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
MIXED = re.compile(r"\\frac(?:[0-9]|\{[0-9]+\})(?:[0-9]|\{[0-9]+\})")   # 1\frac{1}{2}; not 2\frac{\pi}{3}


class Parser:
    """expr := term (('+' | '-') term)*;  term := factor (('*' | '/' | \\cdot | \\times | \\div | implicit) factor)*;
    factor := ('-' | '+') factor | atom ('^' atom)*;  atom := number | \\pi | \\frac A B | \\sqrt[n] A | ( expr ) |
    { expr }. A \\frac or \\sqrt argument may be a single character ("\\frac12", "\\sqrt2"), as in LaTeX."""

    def __init__(self, s: str):
        self.s, self.i, self.depth = s, 0, 0

    def peek(self, word: str) -> bool:
        return self.s.startswith(word, self.i)

    def take(self, word: str) -> bool:
        if self.peek(word):
            self.i += len(word)
            return True
        return False

    def nest(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise NotANumber("nested too deep")

    def parse(self):
        v = self.expr()
        if self.i != len(self.s):
            raise NotANumber(f"unexpected text at {self.i}")
        return v

    def expr(self):
        v = self.term()
        while self.i < len(self.s) and self.s[self.i] in "+-":
            sign = self.s[self.i]
            self.i += 1
            w = self.term()
            v = checked(v + w if sign == "+" else v - w)         # (float sums: 0.0 may be exact)
        return v

    def term(self):
        v = self.factor()
        while True:
            if self.take("*") or self.take("\\cdot") or self.take("\\times"):
                w = self.factor()
                v = checked(v * w, v != 0 and w != 0)
            elif self.take("/") or self.take("\\div"):
                w = self.factor()
                if w == 0:
                    raise NotANumber("division by zero")
                v = checked(v / w, v != 0)
            elif self.i < len(self.s) and (self.s[self.i] in "0123456789.({\\"):   # implicit: 2\sqrt{3}, 3(4)
                w = self.factor()
                v = checked(v * w, v != 0 and w != 0)
            else:
                return v

    def factor(self):
        self.nest()
        if self.take("-"):
            v = -self.factor()
        elif self.take("+"):
            v = self.factor()
        else:
            v = self.atom()
            while self.take("^"):
                v = checked(power(v, self.atom(single="exponent")), v != 0)
        self.depth -= 1
        return v

    def atom(self, single: str = ""):
        """A number, constant, command or group. single="digit": a \\frac or \\sqrt argument, where a bare number
        stands for its first digit as in LaTeX; single="exponent": 2^10 reads 2^{10} (as sympy-based graders do, not
        LaTeX's 2^1 0). Neither starts a mixed number."""
        self.nest()
        s, i = self.s, self.i
        if self.take("{"):
            v = self.group("}")
        elif self.take("("):
            v = self.group(")")
        elif self.take("\\pi"):
            v = math.pi
        elif self.take("\\frac"):
            num, den = self.atom(single="digit"), self.atom(single="digit")
            if den == 0:
                raise NotANumber("division by zero")
            v = checked(num / den, num != 0)
        elif self.take("\\sqrt"):
            n = 2
            if self.take("["):
                n = self.group("]")
                if not (isinstance(n, Fraction) and n.denominator == 1 and 2 <= n <= 64):
                    raise NotANumber("root index")
            x = self.atom(single="digit")
            v = checked(root(x, int(n)), x != 0)
        elif i < len(s) and (m := NUMBER.match(s, i)):
            text = s[i] if single == "digit" and s[i].isdigit() else m.group()   # \frac12: one digit each
            self.i = i + len(text)
            v = Fraction(text if text[0] != "." else "0" + text)
            if single != "digit" and self.peek("."):              # "3.5.2" is not 3.5 times 0.2
                raise NotANumber(f"two decimal points at {self.i}")
            if not single and text.isdigit() and MIXED.match(s, self.i):   # a mixed number: 1\frac{1}{2} is 3/2
                v = checked(v + self.atom())
        else:
            raise NotANumber(f"unexpected text at {i}")
        self.depth -= 1
        return v

    def group(self, closing: str):
        v = self.expr()
        if not self.take(closing):
            raise NotANumber(f"expected {closing!r}")
        return v


def value(s: str):
    """The value of an answer (a Fraction or a finite float), ±inf for \\infty, or None if it is not a number."""
    if s in ("\\infty", "+\\infty", "-\\infty", "\u221e", "-\u221e"):
        return -math.inf if s.startswith("-") else math.inf
    if not s or len(s) > MAX_ANSWER_CHARS:
        return None
    try:
        return Parser(s).parse()
    except (NotANumber, ArithmeticError, ValueError, RecursionError):   # OverflowError is an ArithmeticError
        return None


def same_value(a, b) -> bool:
    """Exact for two Fractions (1/3 is not 0.333333); else a relative tolerance (floats from \\sqrt and \\pi)."""
    if a is None or b is None:
        return False
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    try:
        a, b = float(a), float(b)
    except OverflowError:                       # an exact value past ~1e308 against a float: not the same
        return False
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Comparing answers: sets, intervals and tuples element-wise, single answers by value

def split_top(s: str) -> list[str]:
    """s split at its commas that are outside every bracket and brace."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return parts + [s[start:]]


def encloses(s: str) -> bool:
    """True if s[0] is a bracket that closes at s[-1] (not "(1,2),(3,4)", whose first bracket closes earlier)."""
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False


def shape(s: str) -> tuple[str, list[str]]:
    """(kind, elements): kind is the bracket pair of an interval or tuple ("(]", "()", ...), "set" for \\{...\\} or
    a bare comma list, or "" for a single answer."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "set", split_top(s[2:-2])
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and encloses(s):
        inner = split_top(s[1:-1])
        if len(inner) > 1:
            return s[0] + s[-1], inner
    parts = split_top(s)
    return ("set", parts) if len(parts) > 1 else ("", parts)


def same_answer(p: str, g: str, depth: int = 0) -> bool:
    """Normalised answers p and g: equal strings, or the same shape with equal elements (tuples and intervals in
    order, sets in any order; elements may be tuples themselves, up to 3 levels), or a single equal value."""
    if p == g:
        return True
    (pk, pe), (gk, ge) = shape(p), shape(g)
    if pk != gk or len(pe) != len(ge):
        return False
    if pk == "":
        return same_value(value(p), value(g))
    if depth >= 3:
        return False
    if pk != "set":
        return all(same_answer(a, b, depth + 1) for a, b in zip(pe, ge))
    unmatched = list(ge)                       # sets: each predicted element takes one equal gold element
    for a in pe:
        hit = next((k for k, b in enumerate(unmatched) if same_answer(a, b, depth + 1)), None)
        if hit is None:
            return False
        unmatched.pop(hit)
    return True


def math_equal(pred: str, gold: str) -> bool:
    """True if pred and gold are the same answer under the MATH / PRM800K conventions (module docstring): equal
    normalised strings, or the same interval / tuple / set element by element, or the same value."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    p, g = normalize(pred), normalize(gold)
    if not p or not g:                        # an empty answer matches nothing, not even an empty reference
        return False
    if len(p) > MAX_ANSWER_CHARS or len(g) > MAX_ANSWER_CHARS:
        return p == g
    return same_answer(p, g)
