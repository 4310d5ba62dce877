"""The course's grader grades behaviour, not one value: every plausible wrong implementation in tests/course_mutants/
gets a FAIL verdict, and the reference and a second, independently written correct version get PASS on every
function.

In-process and fast (tools.course.grade_versions: one pytest session per assignment runs the registry's tests once
per version, each version's bodies swapped into the loaded modules; a mutant stops at its first FAIL). The verdicts
are those of `python -m tools.course check` (course.verdict); test_course.py proves `check` itself on the reference
and the blank starter.

    python -m pytest -q tests/test_course_mutants.py
"""
import pytest

from course_mutants import NUMBERS, load
from tools import course

pytestmark = pytest.mark.usefixtures("one_thread")


def functions(target: str) -> list:
    """The loaded function object of a target and every module attribute bound to it (by `from x import f`)."""
    import importlib
    import sys
    file, name = target.split(":")
    owner = importlib.import_module(file[:-3].replace("/", "."))
    for part in name.split(".")[:-1]:
        owner = getattr(owner, part)
    f = owner.__dict__[name.split(".")[-1]]
    return [f] + sorted(f"{m.__name__}.{k}" for m in list(sys.modules.values()) if m is not None
                        for k, v in list(getattr(m, "__dict__", {}).items()) if v is f)


@pytest.mark.parametrize("n", NUMBERS)
def test_grader_fails_every_mutant_and_passes_two_correct_versions(n):
    m, a = load(n), course.BY_N[n]
    targets = {f.target for f in a.functions}
    assert set(m.CORRECT) == targets, "CORRECT must rewrite every function of the assignment"
    assert len(m.MUTANTS) >= (14 if n in (5, 7, 8) else 10)
    assert {t for t, _ in m.MUTANTS.values()} == targets, "every function needs its mutants"
    versions = {"reference": {}, "correct": m.CORRECT, **{name: {t: body} for name, (t, body) in m.MUTANTS.items()}}
    loaded = {t: functions(t) for t in targets}
    got = course.grade_versions(n, versions, stop_early=set(m.MUTANTS))
    for t, (f, *names) in loaded.items():                        # modules imported meanwhile may add names
        assert functions(t)[0] is f and set(names) <= set(functions(t)[1:]), f"{t} was not put back"
    for label in ("reference", "correct"):
        assert {t: v["verdict"] for t, v in got[label].items()} == dict.fromkeys(targets, "PASS"), \
            (label, {t: v["why"] for t, v in got[label].items() if v["verdict"] != "PASS"})
    escaped = [name for name in m.MUTANTS if not any(v["verdict"] == "FAIL" for v in got[name].values())]
    assert not escaped, f"mutants the grader passes: {escaped}"
