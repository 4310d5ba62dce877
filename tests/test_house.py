"""The repository as a reader meets it: the paper's modules at the top, machinery in infra/, tools in tools/, no
import circle, no source file too long to read, the README an index, and every link between the documents resolves.

    python -m pytest -q tests/test_house.py
"""
import ast
import shlex
import re

import pytest

from conftest import REPO

DOCS = ["README.md", "PAPER.md", "COURSE.md", *sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md"))]
SOURCES = sorted(p.relative_to(REPO) for d in (".", "infra", "tools") for p in (REPO / d).glob("*.py"))
MODULES = {".".join(p.with_suffix("").parts) for p in SOURCES} - {"infra.__init__", "tools.__init__"}


def import_graph(root, sources, modules: set) -> dict:
    """module -> the project modules its file imports, at any depth (inside functions too): `import x`,
    `from x import y`, `from infra import trainer` (-> infra.trainer)."""
    graph = {}
    for path in sources:
        found = set()
        for node in ast.walk(ast.parse((root / path).read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[".".join(path.relative_to(root).with_suffix("").parts if path.is_absolute() else
                       path.with_suffix("").parts)] = found & modules
    return graph


def find_circle(graph: dict) -> list[str] | None:
    """A path m -> ... -> m through the graph, or None."""
    for start in sorted(graph):
        seen, stack = set(), [(m, [start, m]) for m in sorted(graph[start])]
        while stack:
            m, trail = stack.pop()
            if m == start:
                return trail
            if m not in seen:
                seen.add(m)
                stack += [(n, trail + [n]) for n in sorted(graph.get(m, ()))]
    return None


def test_no_import_circle():
    """No module reaches itself through the imports of the project's modules, counting imports inside functions: a
    circle dodged by a late import is still a circle (a reader cannot read either module first)."""
    circle = find_circle(import_graph(REPO, SOURCES, MODULES))
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_check_sees_late_imports(tmp_path):
    """The check above finds a circle closed by an import inside a function, and a package-style import."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from infra import c\n")
    (tmp_path / "infra").mkdir()
    (tmp_path / "infra" / "c.py").write_text("def g():\n    import a\n")
    files = [tmp_path / "a.py", tmp_path / "b.py", tmp_path / "infra" / "c.py"]
    assert find_circle(import_graph(tmp_path, files, {"a", "b", "infra.c"})) == ["a", "b", "infra.c", "a"]
    (tmp_path / "infra" / "c.py").write_text("def g():\n    import os\n")
    assert find_circle(import_graph(tmp_path, files, {"a", "b", "infra.c"})) is None


@pytest.mark.parametrize("path", [str(p) for p in SOURCES])
def test_source_files_stay_readable(path):
    """No source file outside tests/ over 800 lines: what grows past it is split where a reader can follow."""
    assert len((REPO / path).read_text().splitlines()) <= 800


def test_readme_is_an_index():
    """Measurements and internals live in docs/; the README is read in five minutes (nanoGPT's is 14 KB)."""
    assert (REPO / "README.md").stat().st_size <= 30_000


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    """[text](path) and [text](path#anchor) to a file of the repository: the file exists, seen from the document."""
    path = REPO / doc
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    missing = [link for link in local if not (path.parent / link).exists()]
    assert not missing, f"{doc}: links to {missing}, which do not exist"


def test_no_document_sends_a_reader_outside_the_repository():
    """What a reader needs is written here: no pointer to notes that users do not get."""
    for doc in DOCS + [p.relative_to(REPO).as_posix() for p in [*REPO.glob("*.py"), *REPO.glob("tests/*.py")]]:
        text = (REPO / doc).read_text()
        assert ".." + "/shared" not in text and "style" + ".md" not in text, doc


def defined_names() -> tuple[dict, dict]:
    """({module: its top-level names}, {class: its methods, fields and self.attributes}) over the sources."""
    modules, classes = {}, {}
    for path in SOURCES:
        tree = ast.parse((REPO / path).read_text())
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            if isinstance(node, ast.ClassDef):
                members = classes.setdefault(node.name, set())
                for sub in ast.walk(node):
                    if isinstance(sub, ast.FunctionDef):
                        members.add(sub.name)
                    elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                        members.add(sub.target.id)
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        members.add(sub.attr)
        modules[".".join(path.with_suffix("").parts)] = names
    return modules, classes


@pytest.mark.parametrize("doc", DOCS)
def test_code_the_documents_name_exists(doc):
    """Every `module.name`, `Class.member` and `path/file.py` a document names in backquotes exists: PAPER.md's
    equation -> code map, COURSE.md's functions and the docs follow the code when it moves."""
    modules, classes = defined_names()
    missing = []
    for ref in re.findall(r"`([A-Za-z_][\w./]*)`", (REPO / doc).read_text()):
        if "/" in ref or re.search(r"\.(py|json|md|model|safetensors|pth|jsonl|txt|png)$", ref):
            if ref.endswith(".py") and "/" in ref and not (REPO / ref).exists():
                missing.append(ref)
            continue
        parts = ref.split(".")
        if len(parts) < 2:
            continue
        module = next((".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1) if ".".join(parts[:k]) in modules),
                      None)
        if module is not None:
            rest = parts[len(module.split(".")):]
            if rest[0] not in modules[module] or (len(rest) > 1 and rest[1] not in classes.get(rest[0], {rest[1]})):
                missing.append(ref)
        elif parts[0] in classes and parts[1] not in classes[parts[0]]:
            missing.append(ref)
    assert not missing, f"{doc} names {missing}, which the code does not define"


def documented_commands() -> dict:
    """{(script, subcommand): flags} of every `python ...` / `torchrun ...` command in the documents' code blocks;
    script is a path (train.py) or a module (tools.course); train.py's subcommand is its --stage."""
    found = {}
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", (REPO / doc).read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line.replace("$", "").replace(";", " ; "), comments=True)
                parts = [[]]
                for t in tokens:
                    parts.append([]) if t in ("&&", ";") else parts[-1].append(t)
                for words in parts:
                    if not words or words[0] not in ("python", "torchrun"):
                        continue
                    at = next((i for i, w in enumerate(words) if w.endswith(".py") or w == "-m"), None)
                    if at is None:
                        continue
                    script, rest = (words[at + 1], words[at + 2:]) if words[at] == "-m" else (words[at], words[at + 1:])
                    if script in ("pytest", "tools.mutation"):    # pytest's flags; mutmut's (a dev-only install)
                        continue
                    sub = rest[rest.index("--stage") + 1] if "--stage" in rest else \
                        (rest[0] if rest and not rest[0].startswith("-") and script in SUBCOMMANDS else "")
                    flags = {w.split("=")[0] for w in rest if w.startswith("-") and w not in ("-h", "--help")}
                    found.setdefault((script, sub), set()).update(flags)
    return found


SUBCOMMANDS = {"eval.py", "data.py", "tools.course"}


def test_documented_commands_exist_with_their_flags():
    """Every command a document shows names a script that exists and flags that script accepts (its --help lists
    them); the runs themselves are tested by the test file of each script."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    commands = documented_commands()
    assert ("train.py", "pretrain") in commands and ("pipeline.py", "") in commands   # the parse reads the documents

    def check(item):
        (script, sub), flags = item
        argv = ["-m", script] if not script.endswith(".py") else [str(REPO / script)]
        argv += ["--stage", sub] if script == "train.py" else ([sub] if sub else [])
        p = subprocess.run([sys.executable, *argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        unknown = sorted(f for f in flags if f not in p.stdout and f.replace("--no-", "--") not in p.stdout)
        return f"{script} {sub}: exit {p.returncode} {p.stderr[-300:]}" if p.returncode else \
            (f"{script} {sub}: flags {unknown} not in its --help" if unknown else None)
    with ThreadPoolExecutor(2) as pool:
        problems = [r for r in pool.map(check, sorted(commands.items())) if r]
    assert not problems, "\n".join(problems)
