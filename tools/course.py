"""tools/course.py: the starter and the grader of the course in COURSE.md, one small tool.

    python -m tools.course list                  the assignments, their functions, and which ones are blank now
    python -m tools.course start N               blank assignment N's functions: each body becomes
                                           raise NotImplementedError("assignment N: ..."); signatures, docstrings
                                           and the def line's shape comments stay. The reference bodies are stored
                                           first (.git/course/, or .course/ outside a git checkout)
    python -m tools.course check N [N ...]       run exactly the tests that grade assignment N and print a verdict per
                                           function: PASS, NOT IMPLEMENTED, FAIL (the first failing test and its
                                           message) or BLOCKED (its own tests pass; others wait for a function
                                           still blank). Exit status 0 when every function passes
    python -m tools.course solution N            put the reference bodies back (the stored copy, else git HEAD)

`start` edits the files in place (the checkout is the student's) and refuses, in one line, when a file it would edit
has uncommitted changes (--force to go ahead: the current bodies are then what `solution` restores). `solution`
refuses to overwrite a body that is neither blank nor the reference (your own attempt) unless --force, and then
keeps your version in the store, a new file each time (no version is overwritten). Every file is written aside and
renamed (infra/files.py), so a failure mid-write leaves it whole. Without a stored copy `solution` reads git HEAD,
and refuses when HEAD holds the stubs (committed after `start`): no reference is left there to restore. After
`start N` and `solution N` the files are byte-identical to before.

The registry below is the single source of truth: each assignment's functions and the pytest node ids that grade
each one. COURSE.md is the handout (goals, paper section, shape contracts, what to run, numbers, questions);
tests/test_course.py proves, for every assignment, that `check` fails the blank starter and passes the reference.
This file imports neither torch nor the model code (only infra/files.py, the standard library's writer): it reads and
writes source text (ast, tokenize) and runs pytest.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tokenize
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from infra.files import atomic_write, check_out_file

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------------
# The assignments: functions to write, and the tests that grade each one (pytest node ids; an id without [params]
# selects every parametrisation)


@dataclass
class Function:
    file: str                  # e.g. "model.py"
    name: str                  # qualified name inside the file, e.g. "Attention.forward"
    tests: list[str]           # pytest node ids that grade it; the first one calls it directly

    @property
    def target(self) -> str:
        return f"{self.file}:{self.name}"


@dataclass
class Assignment:
    n: int
    title: str
    paper: str
    functions: list[Function] = field(default_factory=list)
    pending: str = ""          # set while the code the assignment needs has not landed


M, C, T, R, CT, EV, Q = ("tests/test_model.py::", "tests/test_cola.py::", "tests/test_train.py::",
                         "tests/test_rl.py::", "tests/test_course.py::", "tests/test_eval.py::", "tests/test_mcts.py::")
TREE = Q + "test_backup_puct_and_td_test_by_hand"            # a hand-built tree: PUCT, backup, the TD test
PARITY = M + "test_hf_checkpoint_written_by_us"                 # logits and greedy tokens == transformers' Llama
PG = CT + "test_a7_policy_loss_gradient_by_formula"             # GRPO's and ReMax's d loss / d logp, per case

ASSIGNMENTS = [
    Assignment(1, "The Llama-3.1 base: RMSNorm, llama3-scaled RoPE, GQA attention with a KV cache",
               "PAPER.md §2 (Base)", [
                   Function("model.py", "RMSNorm.forward", [CT + "test_a1_rmsnorm_by_formula", PARITY]),
                   Function("model.py", "rope_frequencies", [M + "test_rope_frequencies_equal_transformers_llama3",
                                                             PARITY]),
                   Function("model.py", "apply_rope", [CT + "test_a1_apply_rope_by_formula",
                                                       M + "test_apply_rope_equals_meta_complex_multiply", PARITY]),
                   Function("model.py", "KVCache.update", [
                       CT + "test_a1_kv_cache_update", M + "test_prefill_chunk_after_cached_prefix_equals_uncached",
                       M + "test_greedy_kv_cache_equals_no_cache_and_rows_are_independent"]),
                   Function("model.py", "Attention.forward", [
                       CT + "test_a1_attention_by_formula", PARITY,
                       M + "test_prefill_chunk_after_cached_prefix_equals_uncached",
                       M + "test_greedy_kv_cache_equals_no_cache_and_rows_are_independent"]),
               ]),
    Assignment(2, "Direct action assignment: straight-through Gumbel-softmax and the entropy regulariser",
               "PAPER.md §2 (Direct assignment), §3 (Stage A); Algorithm 1", [
                   Function("idm.py", "gumbel_softmax_st", [
                       C + "test_gumbel_hard_sample_is_exact_softmax_draw", CT + "test_a2_straight_through_gradient",
                       C + "test_straight_through_trains_the_idm"]),
                   Function("idm.py", "entropy_regulariser", [
                       C + "test_entropy_regulariser_is_minus_beta_entropy",
                       C + "test_straight_through_trains_the_idm"]),
               ]),
    Assignment(3, "The language world model: merge module, world-model logits, and what the actions do",
               "PAPER.md §2 (Codebook, Merge module, World model), §6 (semantic diversity)", [
                   Function("cola.py", "MergeMLP.forward", [CT + "test_a3_merge_mlp_by_formula",
                                                            C + "test_world_logits_match_formula"]),
                   Function("cola.py", "MergeModule.forward", [CT + "test_a3_merge_module_is_a_residual_stack",
                                                               C + "test_world_logits_match_formula"]),
                   Function("cola.py", "CoLA.world_state_from_code", [
                       CT + "test_a3_world_state_from_code_by_formula",
                       T + "test_fta_p_base_grad_chooses_the_side_of_the_difference"]),
                   Function("cola.py", "CoLA.world_state", [C + "test_world_logits_match_formula",
                                                            C + "test_straight_through_trains_the_idm"]),
                   Function("eval.py", "embed", [EV + "test_embed_mean_pools_each_sequence_alone"]),
                   Function("eval.py", "mean_pairwise_cosine", [EV + "test_mean_pairwise_cosine_by_hand"]),
                   Function("eval.py", "distinct_n", [EV + "test_distinct_n_by_hand"]),
               ]),
    Assignment(4, "Stage A: learning the actions, alive actions, and the VQ codebook that collapses",
               "PAPER.md §3 (Stage A), §6 (codebook health); Algorithm 1", [
                   Function("train.py", "pretrain_loss", [CT + "test_a4_pretrain_loss_by_formula",
                                                          CT + "test_a4_pretrain_loss_gradient_by_formula",
                                                          T + "test_pretrain_loss_trains_idm_codebook_merge_only"]),
                   Function("idm.py", "codebook_usage", [C + "test_codebook_usage_and_policy_helpers"]),
                   Function("cola.py", "nearest_code", [CT + "test_a4_nearest_code_brute_force"]),
                   Function("train.py", "vq_pretrain_loss", [CT + "test_a4_vq_pretrain_loss_by_formula"]),
               ]),
    Assignment(5, "Stage B: cloning the inverse dynamics model into a policy",
               "PAPER.md §3 (Stage B); Algorithm 1", [
                   Function("cola.py", "CoLA.idm_labels", [C + "test_idm_reads_exactly_one_token_ahead"]),
                   Function("cola.py", "CoLA.policy_logits", [C + "test_policy_is_causal",
                                                              C + "test_generate_cache_matches_recompute[policy]"]),
                   Function("train.py", "bc_loss", [T + "test_bc_loss_trains_policy_only",
                                                    T + "test_losses_count_exactly_the_response_targets",
                                                    T + "test_bc_accuracy_counts_the_response_targets_only"]),
                   Function("eval.py", "cola_metrics", [CT + "test_a5_cola_metrics_by_hand"]),
               ]),
    Assignment(6, "Fine-tuning under action guidance: FTA-I and FTA-P against token SFT, and what retention means",
               "PAPER.md §3 (FTA); Algorithm 2", [
                   Function("infra/ce.py", "masked_ce", [T + "test_masked_ce_matches_hand_computation"]),
                   Function("infra/ce.py", "ChunkedCE.backward", [
                       T + "test_chunked_ce_equals_unchunked_values_and_grads",
                       T + "test_chunked_ce_frozen_head_gets_no_gradient_and_no_mask_counts_nothing"]),
                   Function("train.py", "base_loss", [T + "test_activation_checkpointing_same_loss_and_grads",
                                                      T + "test_losses_count_exactly_the_response_targets"]),
                   Function("train.py", "fta_i_loss", [T + "test_fta_losses_train_the_base",
                                                       T + "test_fta_i_gradient_does_not_pass_through_the_idm",
                                                       T + "test_losses_count_exactly_the_response_targets"]),
                   Function("train.py", "fta_p_loss", [CT + "test_a6_fta_p_loss_by_formula",
                                                       T + "test_fta_losses_train_the_base",
                                                       T + "test_losses_count_exactly_the_response_targets"]),
               ]),
    Assignment(7, "RL over latent actions against RL over tokens: GRPO, ReMax and the KL estimators",
               "PAPER.md §4; Algorithm 4", [
                   Function("policy.py", "action_log_probs", [C + "test_codebook_usage_and_policy_helpers"]),
                   Function("rl.py", "grpo_advantages", [R + "test_grpo_advantages_by_hand"]),
                   Function("rl.py", "k1", [R + "test_kl_estimators_by_hand"]),
                   Function("rl.py", "k3", [CT + "test_a7_k3_by_formula", R + "test_kl_estimators_by_hand"]),
                   Function("rl.py", "aggregate", [CT + "test_a7_aggregate_by_hand",
                                                   R + "test_grpo_clipped_loss_by_hand"]),
                   Function("rl.py", "grpo_loss", [R + "test_grpo_clipped_loss_by_hand"] + [
                       PG + f"[grpo-{case}]" for case in ("reward-sequence-None", "loss-sequence-None",
                                                          "loss-token-None", "loss-token-12.0")]),
                   Function("rl.py", "remax_loss", [R + "test_remax_loss_is_reinforce"] + [
                       PG + f"[remax-{case}]" for case in ("reward-sequence-None", "loss-token-12.0")]),
               ]),
    Assignment(8, "Tree search over latent actions: the Double-DQN target, PUCT, the backup and MCTS-Q's TD test",
               "PAPER.md §5; Algorithm 3", [
                   Function("qnet.py", "double_dqn_targets", [Q + "test_double_dqn_targets_by_hand"]),
                   Function("mcts.py", "puct", [CT + "test_a8_puct_by_formula", TREE]),
                   Function("mcts.py", "edge_value", [CT + "test_a8_edge_value_by_formula", TREE]),
                   Function("mcts.py", "backup", [TREE]),
                   Function("mcts.py", "td_error", [CT + "test_a8_td_error_by_formula", TREE]),
               ]),
]
BY_N = {a.n: a for a in ASSIGNMENTS}

BLANK = 'raise NotImplementedError("assignment {n}: {target} is yours to write (COURSE.md, assignment {n})")'
BLANK_RE = re.compile(r'raise NotImplementedError\("assignment \d+: ')
NOT_IMPLEMENTED = re.compile(r"NotImplementedError: assignment (\d+): (\S+) is yours to write")


def fail(msg: str):
    raise SystemExit(f"tools/course.py: {msg}")


def assignment(n: int, command: str) -> Assignment:
    if n not in BY_N:
        fail(f"{command} {n}: no such assignment; expected one of {', '.join(map(str, BY_N))} (python -m tools.course list)")
    a = BY_N[n]
    if a.pending:
        fail(f"{command} {n}: assignment {n} ({a.title}) {a.pending}")
    return a


# ----------------------------------------------------------------------------------------------------------------
# Finding a function's body in the source text


@dataclass
class Span:
    start: int                 # first line of the body after the docstring (1-based)
    end: int                   # last line of the function (inclusive)
    indent: str                # the body's indentation


def find_def(tree: ast.Module, name: str, where: str) -> ast.FunctionDef:
    """The def of a qualified name ("Class.method" or "function") at the top level of a module."""
    nodes, found = tree.body, None
    for part in name.split("."):
        found = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.name == part), None)
        if found is None:
            fail(f"{where} has no {name}: the course is out of date with the code (update tools/course.py's registry)")
        nodes = found.body
    if not isinstance(found, (ast.FunctionDef, ast.AsyncFunctionDef)):
        fail(f"{where}: {name} is not a function")
    return found


def header_end(lines: list[str], node: ast.FunctionDef) -> int:
    """The line (1-based) holding the ':' that ends the def's signature (tokenize: parentheses may span lines)."""
    src = "".join(lines[node.lineno - 1:node.body[0].lineno])
    depth, seen_def = 0, False
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.NAME and tok.string == "def":
            seen_def = True
        elif tok.type == tokenize.OP and seen_def:
            if tok.string in "([{":
                depth += 1
            elif tok.string in ")]}":
                depth -= 1
            elif tok.string == ":" and depth == 0:
                return node.lineno + tok.start[0] - 1
    raise ValueError("no ':' after the def")


def body_span(text: str, name: str, where: str) -> Span:
    """Lines of a function's body below its signature and docstring: what `start` blanks and `solution` restores."""
    lines = text.splitlines(keepends=True)
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        fail(f"{where} does not parse (line {e.lineno}: {e.msg}); fix it, or get the reference file back with "
             f"`git checkout -- {where.split()[0]}`")
    node = find_def(tree, name, where)
    first = node.body[0]
    has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                   str)
    if has_doc and len(node.body) == 1:
        fail(f"{where}: {name} has a docstring and no body")
    start = first.end_lineno + 1 if has_doc else header_end(lines, node) + 1
    if start > node.body[-1].lineno or start <= node.lineno:
        fail(f"{where}: {name} has its body on its def line; it cannot be blanked")
    stmt = node.body[1] if has_doc else first
    return Span(start, node.end_lineno, " " * stmt.col_offset)


def read_body(text: str, name: str, where: str) -> str:
    span = body_span(text, name, where)
    return "".join(text.splitlines(keepends=True)[span.start - 1:span.end])


def replace_body(text: str, name: str, body: str, where: str) -> str:
    span = body_span(text, name, where)
    lines = text.splitlines(keepends=True)
    return "".join(lines[:span.start - 1]) + body + "".join(lines[span.end:])


def blank_body(text: str, a: Assignment, f: Function) -> str:
    span = body_span(text, f.name, f.file)
    return span.indent + BLANK.format(n=a.n, target=f.target) + "\n"


def is_blank(body: str) -> bool:
    return len(body.strip().splitlines()) == 1 and BLANK_RE.match(body.strip()) is not None


# ----------------------------------------------------------------------------------------------------------------
# git and the stored reference bodies


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def in_git() -> bool:
    try:
        return git("rev-parse", "--is-inside-work-tree").stdout.strip() == "true"
    except FileNotFoundError:               # no git installed
        return False


def store_dir() -> Path:
    """Where `start` keeps the reference bodies: inside .git (never shows in git status), else .course/."""
    if in_git():
        d = Path(git("rev-parse", "--git-dir").stdout.strip())
        return (d if d.is_absolute() else ROOT / d) / "course"
    return ROOT / ".course"


def store_file(n: int) -> Path:
    return store_dir() / f"assignment-{n}.json"


def read_store(n: int) -> dict:
    f = store_file(n)
    return json.loads(f.read_text()) if f.exists() else {}


def write_store(n: int, bodies: dict):
    f = store_file(n)
    if bodies:
        f.parent.mkdir(parents=True, exist_ok=True)
        write_file(f, json.dumps(bodies, indent=1))
    elif f.exists():
        f.unlink()
        if f.parent.name == ".course" and not any(f.parent.iterdir()):
            f.parent.rmdir()                   # outside git: leave the checkout as it was


def write_file(path: Path, text: str):
    """Written aside and renamed (infra/files.py): a failure mid-write (a full disk) leaves the file as it was. The
    file keeps its permissions; an OSError is one line."""
    def write(tmp: Path):
        tmp.write_text(text)
        if path.exists():
            shutil.copymode(path, tmp)
    try:
        atomic_write(path, write)
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror or e}; it is as it was. Free space or fix its permissions, then rerun")


def changed_files(files: list[str]) -> list[str]:
    """Those of `files` with uncommitted changes (staged or not); [] outside git."""
    if not in_git():
        return []
    out = git("status", "--porcelain", "--", *files).stdout
    return [line[3:] for line in out.splitlines() if line.strip()]


def head_text(file: str) -> str | None:
    if not in_git():
        return None
    p = git("show", f"HEAD:./{file}")
    return p.stdout if p.returncode == 0 else None


# ----------------------------------------------------------------------------------------------------------------
# The commands


def files_of(a: Assignment) -> list[str]:
    return sorted({f.file for f in a.functions})


def check_files(a: Assignment, command: str):
    for file in files_of(a):
        if not (ROOT / file).is_file():
            fail(f"{command} {a.n}: {file} not found in {ROOT}")


def start(n: int, force: bool = False, blanked_here: frozenset = frozenset()) -> set[str]:
    """Blank assignment n's functions; returns the files it changed. blanked_here: files this command has just
    blanked for an earlier assignment (start all), which are not uncommitted work."""
    a = assignment(n, "start")
    check_files(a, "start")
    stored = read_store(n)
    dirty = [f for f in changed_files(files_of(a)) if f not in blanked_here]
    if dirty and not stored and not force:     # a second start takes the reference from the store, not the files
        fail(f"start {n}: {', '.join(dirty)} {'has' if len(dirty) == 1 else 'have'} uncommitted changes; commit or "
             f"stash them first, or pass --force (the current bodies then become what `solution {n}` restores)")
    blanked = []
    for f in a.functions:
        path = ROOT / f.file
        text = path.read_text()
        body = read_body(text, f.name, f.file)
        if is_blank(body):
            continue
        if f.target in stored and body != stored[f.target]:          # started before, and written since
            if not force:
                fail(f"start {n}: {f.target} holds your own code; pass --force to blank it again (your version is "
                     f"then kept in {yours_file(n)})")
            keep_yours(n, {f.target: body})
        elif f.target not in stored:
            stored[f.target] = body
            write_store(n, stored)             # stored before the file changes: nothing is ever lost
        write_file(path, replace_body(text, f.name, blank_body(text, a, f), f.file))
        blanked.append(f.target)
    print(f"assignment {n}: {a.title}")
    if blanked:
        print(f"blanked {len(blanked)} function(s): {', '.join(blanked)}")
    else:
        print("every function was blank already")
    print(f"read COURSE.md, assignment {n}; grade with: python -m tools.course check {n}")
    return {f.file for f in a.functions if f.target in blanked}


def graded_numbers() -> list[int]:
    return [a.n for a in ASSIGNMENTS if not a.pending]


def start_all(force: bool = False):
    """Every assignment's functions blank at once (graded use: no reference of a later assignment to read)."""
    for a in ASSIGNMENTS:
        if not a.pending:
            check_files(a, "start")
    done: set[str] = set()
    for n in graded_numbers():
        done |= start(n, force, frozenset(done))


def yours_file(n: int) -> Path:
    """Where the next of your versions of assignment n goes: assignment-N.yours.K.json, K one more than the last."""
    kept = [int(m.group(1)) for p in store_dir().glob(f"assignment-{n}.yours.*.json")
            if (m := re.fullmatch(rf"assignment-{n}\.yours\.(\d+)\.json", p.name))]
    return store_dir() / f"assignment-{n}.yours.{max(kept, default=0) + 1}.json"


def keep_yours(n: int, bodies: dict):
    """Your own versions of functions that start --force or solution --force replace, kept beside the reference: a
    new file each time, so a second --force never overwrites the version the first one kept."""
    if bodies:
        f = yours_file(n)
        f.parent.mkdir(parents=True, exist_ok=True)
        write_file(f, json.dumps(bodies, indent=1))
        print(f"your version of {', '.join(bodies)} is kept in {f}")


def check_head_is_reference(n: int, a: Assignment):
    """Without a stored copy the reference is read from git HEAD, which must not be a commit made after `start` (a
    fresh clone of a student's repository whose stubs were committed): its bodies would be the stubs, or your own."""
    for f in a.functions:
        head = head_text(f.file)
        if head is not None and is_blank(read_body(head, f.name, f"{f.file} at git HEAD")):
            fail(f"solution {n}: the reference is missing: {store_dir()} holds no copy (start keeps it there) and git "
                 f"HEAD holds the blank {f.target} (the stubs were committed); take it from the course's repository, "
                 f"e.g. the last commit before start: git log -- {f.file}, then git show COMMIT:{f.file}")


def reference_body(n: int, f: Function, stored: dict) -> str:
    if f.target in stored:
        return stored[f.target]
    head = head_text(f.file)
    if head is None:
        fail(f"solution {n}: no stored copy of {f.target} (start was not run here) and no git HEAD to read it from")
    return read_body(head, f.name, f"{f.file} at git HEAD")


def solution(n: int, force: bool = False):
    a = assignment(n, "solution")
    check_files(a, "solution")
    stored = read_store(n)
    if any(f.target not in stored for f in a.functions):
        check_head_is_reference(n, a)
    plan = []
    for f in a.functions:
        text = (ROOT / f.file).read_text()
        body, ref = read_body(text, f.name, f.file), reference_body(n, f, stored)
        if body == ref:
            continue
        if not is_blank(body) and not force:
            fail(f"solution {n}: {f.target} holds your own code; pass --force to replace it with the reference "
                 f"(your version is then kept in {yours_file(n)})")
        plan.append((f, body, ref))
    keep_yours(n, {f.target: body for f, body, _ in plan if not is_blank(body)})
    for f, _, ref in plan:
        path = ROOT / f.file
        write_file(path, replace_body(path.read_text(), f.name, ref, f.file))
    write_store(n, {})
    print(f"assignment {n}: restored {len(plan)} reference function(s)" +
          (f": {', '.join(f.target for f, _, _ in plan)}" if plan else " (nothing to restore)"))


def list_assignments():
    for a in ASSIGNMENTS:
        print(f"{a.n}. {a.title} ({a.paper})")
        if a.pending:
            print(f"     {a.pending}")
        for f in a.functions:
            path = ROOT / f.file
            state = "missing file"
            if path.is_file():
                state = "blank" if is_blank(read_body(path.read_text(), f.name, f.file)) else "written"
            print(f"     {state:<8} {f.target}")


# ----------------------------------------------------------------------------------------------------------------
# The grader: run the tests, read pytest's JUnit XML, one verdict per function


def run_tests(ids: list[str], xml: Path, time_limit: float) -> subprocess.CompletedProcess:
    """pytest on the grading tests, each stopped after time_limit seconds (tests/conftest.py fails it), the whole run
    after time_limit for every test plus a minute (an endless loop where the per-test alarm cannot reach, in C)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1"), "COLA_TEST_TIME_LIMIT": str(time_limit)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={xml}", *ids]
    whole = time_limit * len(ids) + 60
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=whole)
    except subprocess.TimeoutExpired:
        fail(f"check: the grading run did not finish in {whole:g} s ({len(ids)} tests x --time-limit {time_limit:g} s "
             f"+ 60 s): a function loops where the per-test limit cannot stop it; run its tests one by one with "
             f"python -m pytest -q <test id>")


def read_junit(xml: Path) -> dict:
    """{test id (path::name[params]): (outcome, first line of the message)}; outcome passed/failed/skipped.
    A module that could not be imported is reported under its path."""
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        tid = f"{cls.replace('.', '/')}.py::{name}" if cls else f"{name.replace('.', '/')}.py"
        outcome, msg = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, msg = "failed", child.get("message") or ""
                if msg in ("", "collection failure"):     # the exception is in the text's "E   " lines
                    errs = [l[1:].strip() for l in (child.text or "").splitlines() if l.startswith("E ")]
                    msg = f"could not import: {errs[-1] if errs else msg}"
                break
            if child.tag == "skipped":
                outcome, msg = "skipped", child.get("message", "")
        out[tid] = (outcome, msg)
    return out


def matching(results: dict, test_id: str) -> list[tuple[str, str, str]]:
    path = test_id.split("::")[0]
    found = [(tid, *r) for tid, r in results.items() if tid == test_id or tid.startswith(test_id + "[")]
    if not found and path in results:                       # the module failed to import
        found = [(test_id, *results[path])]
    return found


def first_line(msg: str, width: int = 200) -> str:
    """The message's first line; a bare `assert ...` gets pytest's next line (`+ where ...`) too."""
    lines = [l.strip() for l in msg.splitlines() if l.strip()]
    line = " | ".join(lines[:2]) if len(lines) > 1 and lines[0].startswith("assert ") else (lines or [""])[0]
    return line if len(line) <= width else line[:width - 3] + "..."


def verdict(f: Function, results: dict) -> dict:
    """PASS / NOT IMPLEMENTED / BLOCKED / FAIL for one function, from its tests' outcomes."""
    runs = [(t, matching(results, t)) for t in f.tests]
    missing = [t for t, found in runs if not found]
    if missing:
        return {"verdict": "FAIL", "why": f"test not found: {missing[0]} (tools/course.py's registry is out of date)"}
    bad = [(tid, outcome, msg) for _, found in runs for tid, outcome, msg in found if outcome != "passed"]
    if not bad:
        return {"verdict": "PASS", "why": f"{sum(len(found) for _, found in runs)} tests pass"}
    blank_in = {tid: NOT_IMPLEMENTED.search(msg) for tid, _, msg in bad}
    if any(m and m.group(2) == f.target for m in blank_in.values()):
        tid = next(t for t, m in blank_in.items() if m and m.group(2) == f.target)
        return {"verdict": "NOT IMPLEMENTED", "why": f"raises NotImplementedError ({tid})"}
    if all(m for m in blank_in.values()):
        waits = sorted({m.group(2) for m in blank_in.values()})
        return {"verdict": "BLOCKED", "why": f"its tests stop at {', '.join(waits)}, still blank"}
    tid, outcome, msg = next((t, o, m) for t, o, m in bad if not blank_in[t])
    return {"verdict": "FAIL", "why": f"{tid} {outcome}: {first_line(msg)}"}


def files_of_all(chosen: list[Assignment]) -> list[str]:
    return sorted({f.file for a in chosen for f in a.functions})


def syntax_error(files: list[str]) -> str:
    """The first syntax error of `files`, in one line, or ""."""
    for file in files:
        try:
            compile((ROOT / file).read_text(), file, "exec")
        except SyntaxError as e:
            return f"{file} line {e.lineno}: SyntaxError: {e.msg}"
    return ""


def import_error(files: list[str]) -> str:
    """Why one of `files` cannot be imported (an error at import time), in one line, or ""."""
    mods = [Path(f).stem for f in files]
    p = subprocess.run([sys.executable, "-c", f"import {', '.join(mods)}"], cwd=ROOT, capture_output=True,
                       text=True)
    if p.returncode == 0:
        return ""
    where = [l.strip() for l in p.stderr.splitlines() if l.strip().startswith("File ") and str(ROOT) in l]
    return f"importing {', '.join(files)} fails: {first_line(p.stderr.strip().splitlines()[-1])}" + \
        (f" ({where[-1]})" if where else "")


TIME_LIMIT = 60.0      # seconds per grading test; every reference test takes under 10 s on a laptop CPU


def check(ns: list[int], verbose: bool = False, json_out: str = "", time_limit: float = TIME_LIMIT) -> int:
    chosen = [assignment(n, "check") for n in dict.fromkeys(ns)]
    for a in chosen:
        check_files(a, "check")
    if json_out:
        check_out_file(json_out, "--json")                   # before the grading run, not after it
        check_not_source(json_out)
    ids = list(dict.fromkeys(t for a in chosen for f in a.functions for t in f.tests))
    broken = syntax_error(files_of_all(chosen))              # before pytest: its "no collectors" says less
    if broken:
        fail(f"check {' '.join(map(str, ns))}: {broken}")
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        p = run_tests(ids, xml, time_limit)
        if p.returncode == 4:                                 # a module the tests import is broken: say where
            broken = import_error(files_of_all(chosen))
            if broken:
                fail(f"check {' '.join(map(str, ns))}: {broken}")
        if not xml.exists():                                  # the process ended before its report
            tail = "; ".join((p.stdout + p.stderr).strip().splitlines()[-3:])
            fail(f"check {' '.join(map(str, ns))}: the grading run ended before its report (exit {p.returncode}): a "
                 f"function may end the process (os._exit, a crash in C); run its tests one by one with python -m "
                 f"pytest -q <test id> ({tail})")
        if p.returncode in (3, 4):                            # pytest's internal and usage errors
            tail = "; ".join((p.stdout + p.stderr).strip().splitlines()[-3:])
            fail(f"check {' '.join(map(str, ns))}: pytest could not run the grading tests (exit {p.returncode}): "
                 f"{tail}")
        results = read_junit(xml)
    report, n_pass, n_all = {}, 0, 0
    for a in chosen:
        print(f"assignment {a.n}: {a.title}")
        report[a.n] = {}
        for f in a.functions:
            v = verdict(f, results)
            report[a.n][f.target] = v
            n_all += 1
            n_pass += v["verdict"] == "PASS"
            print(f"  {v['verdict']:<16} {f.target:<32} {v['why']}")
    print(f"{n_pass} of {n_all} functions pass" + ("" if n_pass == n_all else
          "; see one test's whole output with: python -m pytest -q <test id>"))
    if verbose:
        print(p.stdout[-6000:])
    if json_out:
        write_file(Path(json_out), json.dumps(report, indent=1))
    return 0 if n_pass == n_all else 1


# ----------------------------------------------------------------------------------------------------------------
# The same grader in-process, for many versions of the functions at once (tests/test_course_mutants.py): each
# version's bodies swapped into the loaded modules, the registry's tests run in one pytest session, and the verdicts
# read by verdict() above, as `check` reads them. `check` itself stays a subprocess (a student's os._exit or crash
# in C must not take the grader with it).


@contextmanager
def swapped(bodies: dict, label: str = "swapped"):
    """Every function {target: body} rebuilt from its file's text with that body (as `start` writes one: the body
    below the docstring, dedented or not) and put in place of the loaded one, in its class or module and wherever a
    loaded module imported it by name; all put back after."""
    undo = []
    try:
        for target, body in bodies.items():
            file, name = target.split(":")
            module = importlib.import_module(file[:-3].replace("/", "."))
            text = (ROOT / file).read_text()
            indent = body_span(text, name, file).indent
            body = textwrap.indent(textwrap.dedent(body).strip("\n") + "\n", indent)
            new_text = replace_body(text, name, body, file)
            node = find_def(ast.parse(new_text), name, file)
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            src = textwrap.dedent("".join(new_text.splitlines(keepends=True)[first - 1:node.end_lineno]))
            ns: dict = {}
            exec(compile("\n" * (first - 1) + src, f"{file} ({label})", "exec"), module.__dict__, ns)
            *path, attr = name.split(".")
            owner = module
            for part in path:
                owner = getattr(owner, part)
            old = owner.__dict__[attr]
            places = [(owner, attr)] + [(m, k) for m in list(sys.modules.values()) if path == [] and m is not None
                                        for k, v in list(getattr(m, "__dict__", {}).items()) if v is old
                                        and (m, k) != (owner, attr)]
            for obj, key in places:
                undo.append((obj, key, old))
                setattr(obj, key, ns[attr])
        yield
    finally:
        for obj, key, old in reversed(undo):
            setattr(obj, key, old)


class _Versions:
    """A pytest plugin that runs the collected tests once per version and keeps {label: {test id: (outcome, msg)}}."""

    def __init__(self, a: Assignment, versions: dict, stop_early):
        self.a, self.versions, self.stop_early, self.results = a, versions, set(stop_early), {}

    def pytest_runtestloop(self, session):
        from _pytest.runner import runtestprotocol
        for label, bodies in self.versions.items():
            results = self.results[label] = {}
            order = sorted(self.a.functions, key=lambda f: f.target not in bodies)     # the swapped ones first
            with swapped(bodies, label):
                for item in [i for f in order for t in f.tests for i in session.items
                             if i.nodeid == t or i.nodeid.startswith(t + "[")]:
                    if item.nodeid in results:
                        continue
                    reports = runtestprotocol(item, log=False, nextitem=None)
                    bad = next((r for r in reports if r.failed), None)
                    crash = getattr(getattr(bad, "longrepr", None), "reprcrash", None)
                    results[item.nodeid] = ("passed", "") if bad is None else \
                        ("failed", crash.message if crash else str(bad.longrepr))
                    if bad is not None and label in self.stop_early:
                        break
        return True


def grade_versions(n: int, versions: dict, stop_early=(), time_limit: float = TIME_LIMIT) -> dict:
    """{label: {target: body}} -> {label: {target: verdict}} for assignment n, in this process: a target a version
    does not name keeps the loaded (reference) code. The versions labelled in stop_early are graded only until their
    first failed test (their swapped functions' tests first); a function whose tests did not all run then has a
    verdict only if one of those that ran failed."""
    import pytest
    a = assignment(n, "check")
    ids = list(dict.fromkeys(t for f in a.functions for t in f.tests))
    plugin, env = _Versions(a, versions, stop_early), os.environ.get("COLA_TEST_TIME_LIMIT")
    os.environ["COLA_TEST_TIME_LIMIT"] = str(time_limit)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            code = pytest.main(["-q", "-p", "no:cacheprovider", f"--rootdir={ROOT}", f"--basetemp={tmp}/pt",
                                *[str(ROOT / t) for t in ids]], plugins=[plugin])
    finally:
        os.environ.pop("COLA_TEST_TIME_LIMIT") if env is None else os.environ.update(COLA_TEST_TIME_LIMIT=env)
    if code not in (0, 1, 5) or len(plugin.results) != len(versions):
        fail(f"grade_versions {n}: pytest could not run the grading tests (exit {code})")
    return {label: {f.target: v for f in a.functions if (v := partial_verdict(f, res))}
            for label, res in plugin.results.items()}


def partial_verdict(f: Function, results: dict) -> dict | None:
    """verdict() of f on those of its tests that ran: None when none did, or when some did not and all that did
    passed (a run stopped early knows nothing more)."""
    ran = [t for t in f.tests if matching(results, t)]
    v = verdict(Function(f.file, f.name, ran), results) if ran else None
    return v if v and (len(ran) == len(f.tests) or v["verdict"] != "PASS") else None


# ----------------------------------------------------------------------------------------------------------------
# Command line


def check_not_source(json_out: str):
    """--json must not name a file of the checkout: `check 1 --json model.py` replaced the student's model.py (their
    uncommitted work with it) by the verdicts. A .py file, or any file git tracks, is refused in one line."""
    f = Path(json_out)
    tracked = f.exists() and in_git() and not git("ls-files", "--error-unmatch", str(f.resolve())).returncode
    if f.suffix == ".py" or tracked:
        fail(f"--json {json_out}: {'a file git tracks' if tracked else 'a Python source name'}, which the verdicts "
             f"would replace; expected a new file or earlier verdicts, e.g. verdicts.json")


def number_or_all(s: str):
    if s != "all" and not s.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{s!r}: expected an assignment number or all")
    return s if s == "all" else int(s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/course.py", description="Starter and grader of the course (COURSE.md).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="assignments, their functions, which are blank")
    p = sub.add_parser("start", help="blank assignment N's functions (bodies -> NotImplementedError); N = all: "
                                      "every assignment's at once")
    p.add_argument("n", type=number_or_all)
    p.add_argument("--force", action="store_true", help="even if those files have uncommitted changes")
    p = sub.add_parser("check", help="grade assignments: one verdict per function")
    p.add_argument("n", type=int, nargs="+")
    p.add_argument("--verbose", action="store_true", help="also print pytest's output")
    p.add_argument("--json", default="", help="write the verdicts to this file")
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT,
                   help=f"seconds a grading test may run before it fails (default {TIME_LIMIT:g})")
    p = sub.add_parser("solution", help="restore assignment N's reference bodies (N = all: every assignment's)")
    p.add_argument("n", type=number_or_all)
    p.add_argument("--force", action="store_true", help="even over your own code (kept in the store)")
    a = ap.parse_args(argv)
    if a.cmd == "list":
        list_assignments()
    elif a.cmd == "start":
        start_all(a.force) if a.n == "all" else start(a.n, a.force)
    elif a.cmd == "solution":
        for n in (graded_numbers() if a.n == "all" else [a.n]):
            solution(n, a.force)
    else:
        if not (math.isfinite(a.time_limit) and 0 < a.time_limit <= 86_400):
            fail(f"--time-limit {a.time_limit}: expected a number of seconds > 0, at most a day (86400)")
        return check(a.n, a.verbose, a.json, a.time_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
