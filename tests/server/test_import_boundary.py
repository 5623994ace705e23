"""The engine's import path must not pull in server-only packages (the GPU image has no fastapi)."""

from __future__ import annotations

import subprocess
import sys

SERVER_ONLY = ("fastapi", "uvicorn", "starlette", "prometheus_client")


def test_engine_imports_no_server_packages():
    code = (
        "import sys\n"
        "import nanoflow, nanoflow.cli, nanoflow.entrypoints.llm, nanoflow.engine.engine\n"
        "import nanoflow.executor.model_runner, nanoflow.models.llama, nanoflow.kernels.decode_attention\n"
        f"print(sorted(m for m in {SERVER_ONLY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_server_imports_outside_the_server_package():
    """Statically: only nanoflow/entrypoints/server imports server packages (pydantic included,
    which transformers may or may not import on its own)."""
    import ast
    from pathlib import Path

    import nanoflow

    root = Path(nanoflow.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if (root / "entrypoints" / "server") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(root)}: {n}" for n in names
                          if n.split(".")[0] in (*SERVER_ONLY, "pydantic")]
    assert not offenders, offenders
