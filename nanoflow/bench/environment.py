"""What a bench result records about where it ran: the device, the library versions, and nanoflow's
own commit (kept apart from the harness in throughput.py)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from typing import Any

import torch


def environment(device: torch.device) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    import nanoflow

    env: dict[str, Any] = {
        "device": str(device),
        "device_name": f"CPU ({platform.machine() or 'unknown'})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "nanoflow": nanoflow.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 2), sm_count=props.multi_processor_count,
                   compute_capability=f"{props.major}.{props.minor}")
    env.update(_git_state())
    return env


def _git_state() -> dict[str, Any]:
    """nanoflow's own commit (and whether its tree has changes), whatever the working directory.

    git is asked about the folder of the nanoflow package, and its answer is taken only if that
    repository's top level holds this very package (`<toplevel>/nanoflow/__init__.py`): an exported
    tree (a wheel, an sdist, a copy) inside some other repository gives "unknown", never the commit
    of the repository around it."""
    import nanoflow

    unknown = {"git_commit": "unknown", "git_dirty": None}
    package_init = os.path.realpath(nanoflow.__file__)
    package_dir = os.path.dirname(package_init)
    # -C alone decides which repository: variables a git hook or wrapper may have set would override it.
    env = {k: v for k, v in os.environ.items()
           if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR", "GIT_OBJECT_DIRECTORY")}

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", package_dir, *args], capture_output=True, text=True, timeout=10, env=env)
        if out.returncode != 0:
            raise subprocess.SubprocessError(out.stderr.strip())
        return out.stdout.strip()

    try:
        toplevel = git("rev-parse", "--show-toplevel")
        if not toplevel or not os.path.samefile(os.path.join(toplevel, "nanoflow", "__init__.py"), package_init):
            return unknown
        commit = git("rev-parse", "--verify", "HEAD^{commit}")  # fails (not "HEAD") before the first commit
        dirty = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, no commit, no such file
        return unknown
    return {"git_commit": commit, "git_dirty": bool(dirty)}
