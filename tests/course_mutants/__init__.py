"""Plausible wrong implementations of the course's functions, and a second correct one, per assignment (aN.py).

Each aN.py holds
    CORRECT  {target: body}: an independently written correct version of every function of assignment N;
    MUTANTS  {name: (target, body)}: one function's body replaced by a mistake students make (the comment above each
             says which).
A body is what `python -m tools.course start N` blanks: the lines below the docstring (indentation free).
tests/test_course_mutants.py grades every one in-process with tools.course.grade_versions (the registry's tests,
verdict() as `check` gives it): each mutant must get a FAIL, the reference and CORRECT must PASS.
"""
import importlib

NUMBERS = list(range(1, 9))


def load(n: int):
    return importlib.import_module(f"course_mutants.a{n}")
