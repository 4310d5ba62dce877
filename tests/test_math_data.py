"""Math problems from files (tasks.load_problems) and what reads them: rl.py, qnet.py, mcts.py, search_eval.py
--data / --val-data / --chat, and rl.py --eval-only's greedy accuracy and pass@k.

Tiers: each layout of tests/fixtures/math (problems written for these tests; the tests recompute every answer from
the question) parses to the right prompt and answer; each malformed file fails with one line naming file and line,
before any checkpoint is read; the training order, the held-out split, the chat rendering and the pass@k estimator
against hand-computed values; then one short run of each script on the fixtures at the tiny preset (conftest.chain).

    python -m pytest -q tests/test_math_data.py
"""
import json
import math
import re

import pytest
import torch

import cola
import data
import mcts
import qnet
import rl
import search_eval
import tasks
from conftest import REPO, read_rows, step_rows
from tokenizer import ChatFormat, Tokenizer

FIX = REPO / "tests/fixtures/math"
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# The layouts, as published


def test_math_layout_problem_solution_and_answer_field():
    ps = tasks.load_problems(FIX / "math.jsonl")
    assert len(ps) == 32 and {p.kind for p in ps} == {"math"}
    for p in ps:
        q = p.meta["question"]
        assert p.prompt == f"{q}\n{tasks.MATH_INSTRUCTION}\n" and p.meta["source"].startswith(str(FIX / "math.jsonl:"))
        if m := re.fullmatch(r"Solve for \$x\$: \$(\d+)x \+ (\d+) = (-?\d+)\$\.", q):
            a, b, c = map(int, m.groups())
            assert p.answer == str((c - b) // a) and (c - b) % a == 0
        elif m := re.fullmatch(r"Simplify \$\\frac\{(\d+)\}\{(\d+)\}\$ to lowest terms\.", q):
            g = math.gcd(int(m[1]), int(m[2]))           # the box holds a \frac{}{}: nested braces
            assert p.answer == f"\\frac{{{int(m[1]) // g}}}{{{int(m[2]) // g}}}"
        else:                                            # MATH-500 lines: the "answer" field
            a, b, c = map(int, re.fullmatch(r"What is \$(\d+) \+ (\d+) \\cdot (\d+)\$\?", q).groups())
            assert p.answer == str(a + b * c)
    assert ps[0].meta["question"] == "Solve for $x$: $2x + 1 = -5$." and ps[0].answer == "-3"


def test_the_answer_field_wins_over_the_solution_box(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"problem": "Halve 1.", "solution": "It is $\\boxed{\\frac12}$.",
                             "answer": "\\frac{1}{2}"}) + "\n")
    assert tasks.load_problems(f)[0].answer == "\\frac{1}{2}"


def test_gsm8k_layout_takes_the_number_after_the_hashes_without_its_commas():
    ps = tasks.load_problems(FIX / "gsm8k.jsonl")
    assert len(ps) == 30
    for p in ps:
        n = list(map(int, re.findall(r"\d+", p.meta["question"])))
        assert p.answer == str(n[0] + n[1] * n[2] if "packs" in p.meta["question"] else n[0] * n[1])
    raw = [json.loads(line)["answer"] for line in (FIX / "gsm8k.jsonl").read_text().splitlines()]
    assert "#### 1,000" in raw[16] and ps[16].answer == "1000"


def test_prompt_layout():
    ps = tasks.load_problems(FIX / "prompt.jsonl")
    assert len(ps) == 30 and ps[0].meta["question"] == "Compute 7 * 4 - 4." and ps[0].answer == "24"
    for p in ps:
        a, b, c = map(int, re.findall(r"\d+", p.meta["question"]))
        assert p.answer == str(a * b - c)


def test_the_checker_reads_a_boxed_answer_to_a_file_problem():
    p = tasks.load_problems(FIX / "math.jsonl")[12]                       # \frac{1}{6}
    assert tasks.reward(p, "so it is \\boxed{\\frac{1}{6}}") == 1.0
    assert tasks.reward(p, "so it is \\boxed{\\frac{1}{7}}") == 0.0 and tasks.reward(p, "1/6") == 0.0


def test_a_repeated_question_is_kept_once_and_said(tmp_path, capsys):
    f = tmp_path / "dup.jsonl"
    lines = [{"prompt": "Compute 1 + 1.", "answer": "2"}, {"prompt": "Compute 2 + 2.", "answer": "4"},
             {"question": " Compute 1 + 1.", "answer": "1 + 1 = 2\n#### 2"}]
    f.write_text("\n".join(map(json.dumps, lines)) + "\n")
    ps = tasks.load_problems(f)
    assert [p.meta["source"] for p in ps] == [f"{f}:1", f"{f}:2"]
    assert "1 repeated question(s) dropped" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Malformed files: one line naming the file and the line, before any checkpoint is read


BAD = {"bad_json": "not valid JSON", "not_object": "expected a JSON object, got list",
       "unknown_layout": "unknown layout (fields: label, text)", "two_layouts": "name two layouts",
       "missing_answer": '"question" needs a string field "answer"',
       "missing_solution": '"problem" needs a string field "solution" or "answer"',
       "no_box": '"solution" has no \\boxed{} answer', "no_hashes": 'no "####" before the final answer',
       "empty_answer": "the answer is empty", "empty_box": "the answer is empty", "empty_question": '"prompt" is empty',
       "non_string_answer": '"answer" must be a string or a number, got bool',
       "non_string_problem": '"problem" must be a string, got list'}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_line_is_one_line_naming_file_and_line(case):
    f = FIX / f"bad_{case}.jsonl"                        # a good line, a blank line, the bad line 3, a good line
    with pytest.raises(SystemExit) as e:
        tasks.read_problems(str(f), "--data")
    msg = str(e.value.code)
    assert msg.startswith(f"--data {f}:3: ") and BAD[case] in msg and "\n" not in msg, msg


def test_missing_and_empty_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    for path, expected in ((tmp_path / "nowhere.jsonl", "not found"), (tmp_path, "is a directory"),
                           (tmp_path / "empty.jsonl", "no problems")):
        with pytest.raises(SystemExit, match=expected):
            tasks.read_problems(str(path), "--val-data")


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the data were checked")


@pytest.mark.parametrize("script, flag", [(s, f) for s in ("rl", "qnet", "mcts", "search_eval")
                                          for f in ("--data", "--val-data") if (s, f) != ("mcts", "--val-data")])
def test_scripts_check_the_data_before_any_checkpoint(script, flag, tmp_path, monkeypatch):
    """A nonexistent --init / --ckpt, and no model loader may run: the data's error is what the run says."""
    monkeypatch.setattr(cola, "load_level", no_model)
    bad, good = str(FIX / "bad_no_box.jsonl"), str(FIX / "prompt.jsonl")
    files = ["--data", bad] if flag == "--data" else ["--data", good, "--val-data", bad]
    if script == "mcts":                                 # one problem of --data: no --val-data
        argv, main = ["--ckpt", str(tmp_path), *files], mcts.main           # a directory: the flag check passes
    else:
        where = "--ckpt" if script == "search_eval" else "--init"
        argv = [where, str(tmp_path / "nowhere"), *files, "--out-dir", str(tmp_path / "out")]
        main = {"rl": rl.main, "qnet": qnet.main, "search_eval": search_eval.main}[script]
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith(f"{flag} {bad}:3: ") and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def test_rl_eval_checks_its_out_dir_can_be_written_before_the_model(tmp_path, monkeypatch):
    """An --out-dir where no file can be made (here under /proc) is one line before the model loads, not an error
    after the whole evaluation."""
    monkeypatch.setattr(cola, "load_level", no_model)
    with pytest.raises(SystemExit) as e:
        rl.main(["--init", str(tmp_path / "nowhere"), "--eval-only", "--val-data", str(FIX / "prompt.jsonl"),
                 "--out-dir", "/proc/cola-no-such-dir/eval"])
    msg = str(e.value.code)
    assert msg.startswith("--out-dir /proc/cola-no-such-dir/eval: cannot write math-eval.json") and "\n" not in msg


@pytest.mark.parametrize("argv, expected", [
    (["--task", "arith"], "--task arith and --data / --val-data: pass one"),
    (["--samples", "4"], "--samples is for --eval-only with --data or --val-data"),
    (["--eval-only", "--samples", "2", "--pass-k", "1,4"], "pass@4 needs at least 4 samples per problem"),
    (["--eval-only", "--samples", "4", "--pass-k", "1,x"], "expected distinct positive integers"),
    (["--eval-only", "--pass-k", "4"], "pass@k needs sampled responses; pass --samples n (n >= 4)"),
    (["--eval-only", "--samples", "0", "--pass-k", "1"], "pass@k needs sampled responses"),
    (["--no-data", "--val-data", str(FIX / "prompt.jsonl")], "--val-data: training needs --data too"),
])
def test_rl_flag_conflicts_are_one_line(argv, expected):
    if argv[0] == "--no-data":
        argv = argv[1:]
    else:
        argv = ["--data", str(FIX / "prompt.jsonl"), *argv]
    with pytest.raises(SystemExit) as e:
        rl.parse_args(["--init", "x", *argv])
    assert expected in str(e.value.code) and "\n" not in str(e.value.code)


def test_other_scripts_refuse_task_beside_data(tmp_path):
    for main, argv in ((qnet.parse_q_args, ["--init", "x"]), (mcts.parse_search_args, ["--ckpt", str(tmp_path)]),
                       (search_eval.main, ["--out-dir", str(tmp_path / "o")])):
        with pytest.raises(SystemExit, match="--task.* and --data"):
            main([*argv, "--task", "arith", "--data", str(FIX / "prompt.jsonl")])


# ----------------------------------------------------------------------------------------------------------------
# Order, split, prompt rendering, pass@k


def test_pool_at_is_a_seeded_permutation_per_epoch_and_a_function_of_the_step():
    pool = tasks.load_problems(FIX / "prompt.jsonl")
    run = [p for step in range(15) for p in tasks.pool_at(pool, 3, step, 4)]          # 60 = two epochs
    assert [p.prompt for p in run[:30]] != [p.prompt for p in pool]                     # shuffled
    for epoch in (run[:30], run[30:]):
        assert sorted(p.prompt for p in epoch) == sorted(p.prompt for p in pool)      # each problem once
    assert run[:30] != run[30:] and tasks.pool_at(pool, 3, 7, 4) == run[28:32]          # straddles the epochs
    assert tasks.pool_at(pool, 4, 0, 4) != run[:4]


def test_held_out_split_is_disjoint_and_val_data_is_never_trained_on(tmp_path, capsys):
    train, val = tasks.problem_sets(str(FIX / "gsm8k.jsonl"), "")
    assert len(train) + len(val) == 30 and len(val) >= 1
    assert all(tasks.split_of(p.meta["question"]) == "val" for p in val)
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    with pytest.raises(SystemExit, match="none of its problems falls in the held-out split.*--val-data"):
        tasks.problem_sets(str(FIX / "math.jsonl"), "")
    f = tmp_path / "val.jsonl"                          # holds a question of prompt.jsonl, in another layout
    f.write_text(json.dumps({"question": "Compute 10 * 5 - 5.", "answer": "#### 45"}) + "\n")
    train, val = tasks.problem_sets(str(FIX / "prompt.jsonl"), str(f))
    assert len(train) == 29 and "Compute 10 * 5 - 5." not in {p.meta["question"] for p in train}
    assert "1 problem(s) of --data" in capsys.readouterr().err


def test_plain_prompt_is_question_then_instruction_and_chat_ends_with_the_assistant_header():
    tok = Tokenizer.find(None)
    p = tasks.load_problems(FIX / "gsm8k.jsonl")[0]
    plain = data.encode_problem(tok, p)
    assert plain[0] == tok.bos_id and tok.decode(plain[1:]) == f"{p.meta['question']}\n{tasks.MATH_INSTRUCTION}\n"
    chat = data.encode_problem(tok, p, chat=True)
    fmt = ChatFormat(tok)
    assert chat == [tok.bos_id] + fmt.encode_message("system", tasks.MATH_INSTRUCTION) + \
        fmt.encode_message("user", p.meta["question"]) + fmt.encode_header("assistant")
    assert chat[-len(fmt.encode_header("assistant")):] == fmt.encode_header("assistant")
    countdown = tasks.make_problems("countdown", 1, 0)[0]                 # no system message for generated tasks
    assert data.encode_problem(tok, countdown, chat=True) == fmt.encode_dialog_prompt(
        [{"role": "user", "content": countdown.prompt}])


def test_pass_at_k_against_hand_values():
    assert rl.pass_at_k(5, 2, 1) == pytest.approx(0.4)                    # c / n
    assert rl.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)             # 1 - C(3,2) / C(5,2)
    assert rl.pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)          # 1 - C(7,4) / C(10,4)
    assert rl.pass_at_k(4, 0, 2) == 0.0 and rl.pass_at_k(4, 4, 2) == 1.0 and rl.pass_at_k(5, 4, 2) == 1.0
    n, c, k = 200, 13, 100                                                 # binomials of ~60 digits
    assert rl.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Runs on the fixtures at the tiny preset


FAST = ["--prompts-per-step", "2", "--group", "2", "--max-new-tokens", "6", "--eval-problems", "2", "--eval-every",
        "2", "--ckpt-every", "2", "--judge", "none", "--dtype", "float32"]


def test_rl_trains_on_a_file_and_evaluates_its_held_out_split(chain, tmp_path, monkeypatch):
    batches, real = [], data.rollout

    def rollout(model, tok, prompts, *args):
        batches.append(prompts)
        return real(model, tok, prompts, *args)
    monkeypatch.setattr(data, "rollout", rollout)
    out = tmp_path / "rl"
    rl.main(["--init", str(chain / "bc/final"), "--data", str(FIX / "gsm8k.jsonl"), *FAST, "--steps", "2",
             "--out-dir", str(out)])
    train, val = tasks.problem_sets(str(FIX / "gsm8k.jsonl"), "")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["task"], cfg["data"]) == ("math", str(FIX / "gsm8k.jsonl"))
    assert [r["step"] for r in step_rows(out)] == [1, 2] and (out / "final").is_dir()
    evals = [r["eval"] for r in read_rows(out) if "eval" in r]
    assert [e["problems"] for e in evals] == [1, 1] == [len(val)] * 2
    tok = Tokenizer.find(None)
    steps = [b for b in batches if len(b) == 4]            # 2 prompts x G = 2; the evaluations roll out val's 1
    assert steps == [[data.encode_problem(tok, p) for p in tasks.pool_at(train, 0, s, 2) for _ in range(2)]
                     for s in (0, 1)]
    assert all(b == [data.encode_problem(tok, val[0])] for b in batches if len(b) != 4)


def test_rl_chat_run_with_val_data(chain, tmp_path):
    out = tmp_path / "rl"
    rl.main(["--init", str(chain / "sft/final"), "--level", "token", "--data", str(FIX / "prompt.jsonl"),
             "--val-data", str(FIX / "gsm8k.jsonl"), "--chat", *FAST, "--steps", "1", "--out-dir", str(out)])
    assert [r["eval"]["problems"] for r in read_rows(out) if "eval" in r] == [2, 2]    # --eval-problems of 30


def test_eval_only_accuracy_and_pass_at_k_count_the_checker(chain, tmp_path, monkeypatch):
    """The rollouts are replaced by answers of known correctness (greedy right on even problems; problem i has
    i % 5 right samples of 4, capped): the JSON must hold exactly those counts and their pass@k."""
    val = tasks.load_problems(FIX / "prompt.jsonl")[:9]
    f = tmp_path / "val.jsonl"
    f.write_text("".join(json.dumps({"prompt": p.meta["question"], "answer": p.answer}) + "\n" for p in val))
    answer = {p.prompt: p.answer for p in val}
    want_c = [min(i % 5, 4) for i in range(len(val))]

    def rollout(model, tok, prompts, choose, max_new_tokens):
        texts = [tok.decode(p[1:]) for p in prompts]     # after the bos
        sampled, seen, rows = len(set(texts)) < len(texts), {}, []   # the sampled call repeats each prompt n times
        for t in texts:
            i = [p.prompt for p in val].index(t)
            j = seen[t] = seen.get(t, -1) + 1
            right = j < want_c[i] if sampled else i % 2 == 0
            rows.append({"tokens": [1], "text": f"\\boxed{{{answer[t] if right else 'x'}}}"})
        return rows
    monkeypatch.setattr(data, "rollout", rollout)
    out = tmp_path / "ev"
    result = rl.main(["--init", str(chain / "bc/final"), "--eval-only", "--val-data", str(f), "--samples", "4",
                      "--pass-k", "1,2,4", "--max-new-tokens", "3", "--out-dir", str(out), "--dtype", "float32"])
    saved = json.loads((out / "math-eval.json").read_text())
    assert saved == json.loads(json.dumps(result)) and saved["problems"] == 9
    assert [r["correct"] for r in saved["rows"]] == want_c
    assert [r["greedy_correct"] for r in saved["rows"]] == [i % 2 == 0 for i in range(9)]
    assert saved["greedy_accuracy"] == pytest.approx(5 / 9)
    for k in (1, 2, 4):
        assert saved[f"pass@{k}"] == pytest.approx(sum(rl.pass_at_k(4, c, k) for c in want_c) / 9)
    assert saved["pass@1"] == pytest.approx(sum(want_c) / 36)


def test_eval_only_refuses_more_new_tokens_than_the_context(chain):
    with pytest.raises(SystemExit, match="--max-new-tokens 512: the context of --init .* is 512 tokens"):
        rl.parse_args(["--init", str(chain / "bc/final"), "--eval-only", "--val-data", str(FIX / "prompt.jsonl"),
                       "--max-new-tokens", "512"])


def test_qnet_mcts_and_search_eval_on_a_file(chain, tmp_path):
    q = tmp_path / "q"
    qnet.main(["--init", str(chain / "bc/final"), "--data", str(FIX / "prompt.jsonl"), "--prompts", "2",
               "--samples", "1", "--val-prompts", "1", "--max-new-tokens", "4", "--batch", "2", "--steps", "1",
               "--eval-every", "1", "--out-dir", str(q), "--dtype", "float32"])
    saved = torch.load(q / "trajectories.pt", weights_only=False)
    train, val = tasks.problem_sets(str(FIX / "prompt.jsonl"), "")
    tok = Tokenizer.find(None)
    assert [r["prompt"] for r in saved["train"]] == [data.encode_problem(tok, p) for p in tasks.pool_at(train, 0, 0, 2)]
    assert [r["prompt"] for r in saved["val"]] == [data.encode_problem(tok, val[0])]
    assert saved["key"]["data"] == str(FIX / "prompt.jsonl") and (q / "final").is_dir()

    search, ans = mcts.main(["--ckpt", str(chain / "bc/final"), "--data", str(FIX / "math.jsonl"), "--index", "13",
                             "--n-rounds", "2", "--max-new-tokens", "4", "--chat"])
    p = tasks.load_problems(FIX / "math.jsonl")[13]
    assert search.problem == p and search.root.seg == data.encode_problem(tok, p, chat=True)
    with pytest.raises(SystemExit, match="--index 32: --data .* has 32 problems"):
        mcts.main(["--ckpt", str(chain / "bc/final"), "--data", str(FIX / "math.jsonl"), "--index", "32"])

    rows, text = search_eval.main(["--ckpt", str(chain / "bc/final"), "--methods", "greedy,bon", "--val-data",
                                   str(FIX / "gsm8k.jsonl"), "--problems", "2", "--seeds", "0", "--budgets", "150",
                                   "--max-new-tokens", "4", "--out-dir", str(tmp_path / "ev")])
    firsts = [p.prompt for p in tasks.load_problems(FIX / "gsm8k.jsonl")[:2]]
    assert sorted(r["problem"] for r in rows) == sorted(firsts * 2) and "| bon | 1 |" in text
    assert json.loads((tmp_path / "ev/config.json").read_text())["val_data"] == str(FIX / "gsm8k.jsonl")


def test_file_encodings_line_ends_and_numbers(tmp_path):
    """A BOM, CRLF, U+2028 / U+0085 inside a JSON string (valid JSON, not line ends), numeric answers; a directory
    and an over-long line are one-line errors (the long line read only up to MAX_LINE_CHARS)."""
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "a\u2028b", "answer": 18}, {"question": "c\x85d", "answer": -3},
            {"problem": "e", "answer": 1e-07}, {"prompt": "g", "answer": 2.0}]
    f.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\r\n")
    ps = tasks.load_problems(f)
    assert [(p.meta["question"], p.answer) for p in ps] == [("a\u2028b", "18"), ("c\x85d", "-3"), ("e", "0.0000001"),
                                                            ("g", "2")]
    f.write_text('{"prompt": "a", "answer": NaN}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: \"answer\" must be a finite number"):
        tasks.load_problems(f)
    f.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "' + "x" * (tasks.MAX_LINE_BYTES + 5) + '"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: line longer than 1,000,000 bytes"):
        tasks.load_problems(f)
    f.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not UTF-8 text"):
        tasks.load_problems(f)


@pytest.mark.parametrize("layout", ["math", "gsm8k", "prompt"])
def test_each_layout_runs_the_evaluation_and_the_search_end_to_end(chain, tmp_path, layout):
    """Real rollouts (not replaced): every problem of the file is scored once greedily and --samples times, and
    mcts.py searches the file's last problem."""
    f, bc = FIX / f"{layout}.jsonl", str(chain / "bc/final")
    problems = tasks.load_problems(f)
    out = tmp_path / "ev"
    rl.main(["--init", bc, "--eval-only", "--val-data", str(f), "--samples", "2", "--pass-k", "1,2",
             "--max-new-tokens", "3", "--out-dir", str(out), "--dtype", "float32"])
    saved = json.loads((out / "math-eval.json").read_text())
    assert saved["problems"] == len(saved["rows"]) == len(problems) >= 30
    assert 0 <= saved["pass@1"] <= saved["pass@2"] <= 1 and 0 <= saved["greedy_accuracy"] <= 1
    search, _ = mcts.main(["--ckpt", bc, "--data", str(f), "--index", str(len(problems) - 1), "--n-rounds", "2",
                           "--max-new-tokens", "4"])
    assert search.problem == problems[-1]
