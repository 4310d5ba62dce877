"""infra/files.py: how every script writes a file or a directory, so that a crash, Ctrl-C or a full disk never
leaves a half-written one under its final name. Standard library only: tools/course.py, which imports neither torch
nor the model code, writes the student's files with it too.

    atomic_write     a file: written under a temporary name beside it, then renamed into place
    replace_dir      a directory that must change as a whole: written as a temporary sibling and swapped in
    check_out_file   an output flag (--out, --json), checked before any work: a path a file can be written to
    check_out_dir    the same for a flag naming a directory of outputs (search_eval.py --out-dir; train.py's run
                     directory, whose own checks say more about a checkpoint there)
    check_outside_models   an output path must not lie in a model checkpoint's directory (its config.json)
    read_json_or_empty     a JSON file that may be absent or half-written (a cache, a config to compare with)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def atomic_write(path: Path, write_fn):
    """write_fn(tmp_path), then rename: a crash never leaves a half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_dir(path: Path, write_fn):
    """write_fn(tmp_dir) into an empty sibling .NAME.tmp<pid>, then swap it in for `path`: readers find the old
    directory or the new one, never a mix, and a failure in write_fn leaves the old one untouched. (A crash between
    the two renames leaves the old directory as .NAME.old<pid> beside the absent `path`.)"""
    path = Path(path)
    tmp, old = (path.with_name(f".{path.name}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_fn(tmp)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists():
                os.replace(old, path)          # put the old directory back
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_out_file(path, flag: str):
    """One-line SystemExit unless atomic_write can put a file at `path`: it must not be a directory or any other
    non-regular file (the rename would fail, or replace /dev/null as root), and its nearest existing parent must be
    a directory, and not inside a model checkpoint (check_outside_models). Called before any work, so a mistyped
    --out does not cost the whole computation."""
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"{flag} {path}: a directory; expected the path of a file to write, e.g. {path / 'out.json'}")
    if path.exists() and not path.is_file():
        raise SystemExit(f"{flag} {path}: not a regular file; expected the path of a new or regular file")
    check_parent(path, flag)
    check_outside_models(path, flag)


def check_out_dir(path, flag: str):
    """One-line SystemExit unless `path` is a directory or can be made one (nothing but directories above it)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"{flag} {path}: a file, not a directory; expected a directory for the outputs")
    check_parent(path, flag)


def check_parent(path: Path, flag: str):
    """The nearest existing ancestor of `path` must be a directory: mkdir(parents=True) and rename fail under a file."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SystemExit(f"{flag} {path}: {parent} is a file, not a directory")


MODEL_FILES = ("*.safetensors", "params.json", "consolidated.*.pth")


def check_outside_models(path, flag: str):
    """One-line SystemExit when the output `path` is, or would be created in, a model checkpoint's directory (its
    weights beside it): eval.py --out ckpt/config.json replaced the model's config.json and destroyed the checkpoint.
    Only the nearest existing directory is looked at: a stray weights file higher up (a home directory) must not
    refuse every output below it, and a subdirectory of a checkpoint replaces none of its files."""
    d = Path(path)
    while not d.is_dir() and d != d.parent:
        d = d.parent
    if any(any(d.glob(pattern)) for pattern in MODEL_FILES):
        raise SystemExit(f"{flag} {path}: inside the model checkpoint {d}, whose files it could replace; write it "
                         f"elsewhere")


def read_json_or_empty(f: Path) -> dict:
    """The JSON object in f, or {} when f is absent or not whole JSON (a killed write): the caller recomputes."""
    try:
        return json.loads(Path(f).read_text())
    except (OSError, ValueError):
        return {}
