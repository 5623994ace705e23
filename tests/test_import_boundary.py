"""Import boundaries of the nanoflow package.

- The engine's import path pulls in no server-only package (the GPU image has no fastapi).
- Every import points down the floors of FLOORS, and no import cycle exists inside the package.

The floor and cycle checks read the source (ast), importing nothing: every `import` and
`from ... import` counts, including those inside functions (lazy ones) and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

# The floors of the package, top to bottom; docs/structures.md documents the same order.
# A module may import modules of its own package and of any lower floor: never a higher floor, never
# another package of its own floor. Each floor maps its packages' names to their module prefixes.
FLOORS: tuple[dict[str, tuple[str, ...]], ...] = (
    {"cli": ("nanoflow.cli",)},
    {"bench": ("nanoflow.bench",), "tune": ("nanoflow.tune",)},
    {"entrypoints": ("nanoflow.entrypoints",)},  # entrypoints.server included
    {"engine": ("nanoflow.engine",)},
    {"executor": ("nanoflow.executor",)},
    # the pipeline schedules the ops a model publishes and imports no model (nor a model the pipeline)
    {"pipeline": ("nanoflow.pipeline",), "models": ("nanoflow.models",)},
    {"layers": ("nanoflow.layers",)},
    {"kernels": ("nanoflow.kernels",)},
    {"ground": ("nanoflow.config", "nanoflow.engine_args", "nanoflow.model_arch", "nanoflow.forward_batch",
                "nanoflow.sampling_params")},  # these may import each other (without cycles)
)
# The package's public face (re-exports LLM and SamplingParams): exempt as an importer; a module that
# imports it imports what it re-exports.
FACE = "nanoflow"

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
    root = _package_root()
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


def test_every_import_points_down_the_floors():
    problems = floor_violations(_package_sources())
    assert not problems, "imports against the floors of FLOORS:\n" + "\n".join(problems)


def test_no_import_cycles_in_the_package():
    problems = import_cycles(_package_sources())
    assert not problems, "import cycles:\n" + "\n".join(problems)


def test_the_checker_catches_upward_imports_same_floor_imports_and_cycles():
    """The checker on a made-up package, so that it cannot pass by seeing nothing."""
    clean = {
        "nanoflow/__init__.py": "from nanoflow.entrypoints.llm import LLM\n",
        "nanoflow/cli.py": "import nanoflow\n\ndef main():\n    from nanoflow.bench import run\n",
        "nanoflow/bench/__init__.py": "from .run import run\n",
        "nanoflow/bench/run.py": "from ..entrypoints import llm\nfrom nanoflow import LLM\n",
        "nanoflow/entrypoints/__init__.py": "",
        "nanoflow/entrypoints/llm.py": "from nanoflow.engine.engine import Engine\nimport nanoflow.config\n",
        "nanoflow/entrypoints/server/app.py": "from nanoflow.entrypoints import llm\n",
        "nanoflow/engine/__init__.py": "",
        "nanoflow/engine/engine.py": "from . import scheduler\nfrom nanoflow.executor.runner import Runner\n",
        "nanoflow/engine/scheduler.py": "from nanoflow.config import PAGE_SIZE\n",
        "nanoflow/executor/runner.py": "from nanoflow.models.llama import L\nfrom nanoflow.pipeline.plan import p\n",
        "nanoflow/pipeline/plan.py": "from nanoflow.layers.op import Op\n",
        "nanoflow/models/llama.py": "from nanoflow.layers import op\nfrom nanoflow.kernels.k import k\n",
        "nanoflow/layers/op.py": "from nanoflow.kernels.k import k\nfrom nanoflow.forward_batch import FB\n",
        "nanoflow/kernels/k.py": "from nanoflow.config import PAGE_SIZE\n",
        "nanoflow/config.py": "from nanoflow.model_arch import ModelArch\n",
        "nanoflow/model_arch.py": "import torch\n",
        "nanoflow/forward_batch.py": "from nanoflow import config\n",
    }
    assert floor_violations(clean) == []
    assert import_cycles(clean) == []

    bad = dict(clean)
    bad["nanoflow/executor/runner.py"] = (  # upward (lazy), upward (type-only), the face re-exporting upward
        "from typing import TYPE_CHECKING\n"
        "\n"
        "def run():\n"
        "    from nanoflow.engine.scheduler import Scheduler\n"
        "\n"
        "if TYPE_CHECKING:\n"
        "    from ..entrypoints import llm\n"
        "import nanoflow\n"
    )
    bad["nanoflow/models/llama.py"] = "from nanoflow.pipeline import plan\n"  # same floor, another package
    bad["nanoflow/kernels/k.py"] = "from nanoflow.kernels import k\n"  # a self-import
    bad["nanoflow/config.py"] = "from nanoflow.model_arch import ModelArch\n"
    bad["nanoflow/model_arch.py"] = "def f():\n    import nanoflow.forward_batch\n"  # cycle on the ground floor
    bad["nanoflow/extra.py"] = "import nanoflow.cli\n"  # a module on no floor
    assert floor_violations(bad) == [
        "nanoflow/executor/runner.py:4 imports nanoflow.engine.scheduler (floor 4 'engine') from floor 5 "
        "'executor': a higher floor [lazy import]",
        "nanoflow/executor/runner.py:7 imports nanoflow.entrypoints.llm (floor 3 'entrypoints') from floor 5 "
        "'executor': a higher floor [TYPE_CHECKING import]",
        "nanoflow/executor/runner.py:8 imports nanoflow, which re-exports nanoflow.entrypoints.llm "
        "(floor 3 'entrypoints'), from floor 5 'executor': a higher floor",
        "nanoflow/extra.py:1 module nanoflow.extra is on no floor of FLOORS (tests/test_import_boundary.py)",
        "nanoflow/models/llama.py:1 imports nanoflow.pipeline.plan (floor 6 'pipeline') from floor 6 'models': "
        "another package of the same floor",
    ]
    assert import_cycles(bad) == [
        "cycle among 4 modules (nanoflow, nanoflow.engine.engine, nanoflow.entrypoints.llm, nanoflow.executor.runner): "
        "nanoflow/__init__.py:1 imports nanoflow.entrypoints.llm; nanoflow/engine/engine.py:2 imports "
        "nanoflow.executor.runner; nanoflow/entrypoints/llm.py:1 imports nanoflow.engine.engine; "
        "nanoflow/executor/runner.py:7 imports nanoflow.entrypoints.llm; "
        "nanoflow/executor/runner.py:8 imports nanoflow",
        "cycle among 3 modules (nanoflow.config, nanoflow.forward_batch, nanoflow.model_arch): nanoflow/config.py:1 "
        "imports nanoflow.model_arch; nanoflow/forward_batch.py:1 imports nanoflow.config; nanoflow/model_arch.py:2 "
        "imports nanoflow.forward_batch",
        "self-import of nanoflow.kernels.k: nanoflow/kernels/k.py:1 imports nanoflow.kernels.k",
    ]


# --- the checker -------------------------------------------------------------------------------


def _package_root() -> Path:
    spec = importlib.util.find_spec("nanoflow")  # finds the package without running its __init__
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def _package_sources() -> dict[str, str]:
    """{"nanoflow/engine/engine.py": source, ...} of the package as installed (the working tree)."""
    root = _package_root()
    return {f"nanoflow/{p.relative_to(root).as_posix()}": p.read_text() for p in sorted(root.rglob("*.py"))}


def _module_name(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _place(module: str) -> tuple[int, str] | None:
    """(floor number from 1 at the top, package name) of a nanoflow module, or None."""
    best: tuple[int, int, str] | None = None
    for number, packages in enumerate(FLOORS, start=1):
        for package, prefixes in packages.items():
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), number, package)
    return None if best is None else best[1:]


class _Import(NamedTuple):
    path: str  # of the importing file, e.g. "nanoflow/engine/engine.py"
    line: int
    target: str  # the imported nanoflow module, e.g. "nanoflow.engine.scheduler"
    context: str  # "", "lazy" (inside a function) or "TYPE_CHECKING"


def _imports(sources: dict[str, str]) -> dict[str, list[_Import]]:
    """module -> its imports of nanoflow modules, in source order. `from a.b import c` imports module
    a.b.c where that is a module, else a.b; relative imports are resolved against the importer."""
    modules = {_module_name(p) for p in sources}
    return {_module_name(path): _file_imports(path, source, modules) for path, source in sources.items()}


def _file_imports(path: str, source: str, modules: set[str]) -> list[_Import]:
    module = _module_name(path)
    package = module.split(".") if path.endswith("/__init__.py") else module.split(".")[:-1]
    found: list[_Import] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:
            base = package[: len(package) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]

    def visit(node: ast.AST, context: str) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in dict.fromkeys(targets(node)):
                if target == FACE or target.startswith(FACE + "."):
                    found.append(_Import(path, node.lineno, target, context))
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            context = context or "lazy"
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "TYPE_CHECKING")
            for child in node.orelse:
                visit(child, context)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, context)

    visit(ast.parse(source, filename=path), "")
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def floor_violations(sources: dict[str, str]) -> list[str]:
    """One line per import against FLOORS, and per module on no floor (sorted)."""
    imports = _imports(sources)
    paths = {_module_name(p): p for p in sources}
    face_exports = [i.target for i in imports.get(FACE, [])]
    problems = []
    for module, found in imports.items():
        if module == FACE:
            continue
        path = paths[module]
        here = _place(module)
        if here is None:
            problems.append(f"{path}:1 module {module} is on no floor of FLOORS (tests/test_import_boundary.py)")
            continue
        for imp in found:
            tag = f" [{imp.context} import]" if imp.context else ""
            via = face_exports if imp.target == FACE else [imp.target]
            for target in via:
                there = _place(target)
                what = f"{FACE}, which re-exports {target}" if imp.target == FACE else target
                sep = "," if imp.target == FACE else ""
                if there is None:
                    problems.append(f"{path}:{imp.line} imports {what}{sep} which is on no floor of FLOORS{tag}")
                elif there[0] < here[0]:
                    problems.append(f"{path}:{imp.line} imports {what} (floor {there[0]} '{there[1]}'){sep} from "
                                    f"floor {here[0]} '{here[1]}': a higher floor{tag}")
                elif there[0] == here[0] and there[1] != here[1]:
                    problems.append(f"{path}:{imp.line} imports {what} (floor {there[0]} '{there[1]}'){sep} from "
                                    f"floor {here[0]} '{here[1]}': another package of the same floor{tag}")
    return sorted(problems)


def import_cycles(sources: dict[str, str]) -> list[str]:
    """One line per strongly connected component of more than one module, or self-import, of the
    graph module -> imported nanoflow modules (FACE included): its modules, then its edges with file:line."""
    imports = _imports(sources)
    graph = {m: sorted({i.target for i in found if i.target in imports}) for m, found in imports.items()}

    # Tarjan's algorithm, iterative.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    components.append(sorted(component))

    problems = []
    for component in sorted(components):
        members = set(component)
        edges = [f"{i.path}:{i.line} imports {i.target}" for m in component for i in imports[m] if i.target in members]
        names = ", ".join(component)
        head = f"self-import of {names}" if len(component) == 1 else f"cycle among {len(component)} modules ({names})"
        problems.append(f"{head}: " + "; ".join(edges))
    return problems
