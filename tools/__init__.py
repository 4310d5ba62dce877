"""Developer and teaching tools, run from the repository root: python -m tools.bench, python -m tools.course,
python -m tools.mutation."""
