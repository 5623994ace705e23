"""The bench JSON records nanoflow's own commit (or "unknown"), never that of the repository the
command runs in, nor that of a repository an exported copy of nanoflow sits inside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nanoflow
from nanoflow.bench.environment import _git_state

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

_ENV = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True, env=_ENV).stdout.strip()


def _other_repo(path: Path) -> str:
    """A git repository with one commit; returns that commit."""
    path.mkdir(parents=True, exist_ok=True)
    _git(path, "init", "-q")
    (path / "README").write_text("not nanoflow\n")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "other")
    return _git(path, "rev-parse", "HEAD")


def _nanoflow_commit() -> str | None:
    """HEAD of the repository nanoflow was imported from, when nanoflow sits at its top level."""
    pkg = Path(nanoflow.__file__).resolve().parent
    r = subprocess.run(["git", "-C", str(pkg), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                       text=True, env=_ENV)
    if r.returncode != 0:
        return None
    top, head = r.stdout.split()
    return head if (Path(top) / "nanoflow" / "__init__.py").resolve() == pkg / "__init__.py" else None


def test_commit_is_nanoflows_not_the_working_directorys(tmp_path, monkeypatch):
    other = _other_repo(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    state = _git_state()
    assert state["git_commit"] != other
    ours = _nanoflow_commit()
    if ours is None:
        assert state == {"git_commit": "unknown", "git_dirty": None}
    else:
        assert state["git_commit"] == ours and isinstance(state["git_dirty"], bool)


def test_exported_tree_inside_another_repository_is_unknown(tmp_path):
    """A copy of the package (no .git of its own) committed inside another repository: git would
    answer with that repository's commit, which must not be taken for nanoflow's."""
    repo = tmp_path / "host"
    export = repo / "vendor" / "nanoflow-export"
    shutil.copytree(Path(nanoflow.__file__).resolve().parent, export / "nanoflow",
                    ignore=shutil.ignore_patterns("__pycache__"))
    other = _other_repo(repo)
    code = ("import json, nanoflow; from nanoflow.bench.environment import _git_state; "
            "print(json.dumps([nanoflow.__file__, _git_state()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True,
                         env={**_ENV, "PYTHONPATH": str(export)}, timeout=300)
    imported, state = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(imported).resolve() == (export / "nanoflow" / "__init__.py").resolve()
    assert state["git_commit"] != other
    assert state == {"git_commit": "unknown", "git_dirty": None}
