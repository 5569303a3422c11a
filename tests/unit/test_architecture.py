"""The package's import structure (docs/architecture.md), checked by walking the source's AST.

Rules, for the modules of ``overlay/`` (the generated ``overlay/_gen`` aside):

1. nothing in ``overlay/registry/`` imports ``overlay.controller`` (the registry is
   below the controller; what both need is in ``overlay.zk`` and ``overlay.rpc``);
2. no module imports an underscore name (a module-private name, or a private module)
   from another package (a subpackage, or a top-level module of ``overlay``);
3. the units of ``overlay`` (its subpackages and top-level modules) import each other
   without cycles;
4. imports run one way, down the layers of :data:`LAYERS` (same layer allowed);

and for ``tests/``: 5. no ``sys.path`` edits (helpers are the ``tests.support`` package).

Imports inside functions count as much as those at the top. Each rule is shown to
fail on a small synthetic tree that breaks it.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The layers, bottom up (docs/architecture.md). A unit is a top-level module or subpackage
# of overlay ("overlay" itself is its __init__). A unit may import only units of its own
# layer or below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("overlay", "errors", "resources", "protogen", "sdnotify", "logs"),
    ("abi", "addr", "model", "ops", "policy", "plan", "incremental", "diff", "config", "config_check", "config_hints", "config_neti", "config_yaml",
     "audit", "pending", "ownership", "guard", "backends", "netns", "neti"),
    ("registry", "datapath", "discovery", "zk", "rpc"),
    ("agent", "status", "httpd"),
    ("daemon", "controller", "lab"),
    ("cli", "install_unit"),
)
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


# --- the walk ----------------------------------------------------------------------------------


def _modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py below ``package_dir`` (not ``_gen``)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent)
        if "_gen" in rel.parts:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` of every import in one module;
    ``from pkg import mod`` names the module ``pkg.mod`` when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, "", node.lineno) if sub in modules else (base, alias.name, node.lineno))
    return out


def _unit(module: str, top: str) -> str | None:
    parts = module.split(".")
    if parts[0] != top:
        return None
    return parts[1] if len(parts) > 1 else top


def _owner(module: str, modules: dict[str, Path]) -> str:
    """Whose private names a module may use: its own package's (the directory with its
    ``__init__``); a top-level module of the package is a unit of its own."""
    path = modules.get(module)
    if path is not None and path.name == "__init__.py":
        return module
    if module.count(".") == 1:
        return module
    return module.rpartition(".")[0]


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def check_package(package_dir: Path, layers: dict[str, int] | None = None) -> list[str]:
    """Rule violations (one line each) in the package at ``package_dir``."""
    top = package_dir.name
    modules = _modules(package_dir)
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        where = f"{path.relative_to(package_dir.parent)}"
        unit = _unit(name, top)
        for target, attr, line in _imports(name, path, modules):
            tunit = _unit(target, top)
            if tunit is None:
                continue
            if name.startswith(f"{top}.registry") and tunit == "controller":
                problems.append(f"{where}:{line}: registry imports {target} (the controller is above it)")
            private = [p for p in [*target.split(".")[1:], attr] if p and _private(p)]
            if private and _owner(target, modules) != _owner(name, modules):
                shown = f"{target}.{attr}" if attr else target
                problems.append(f"{where}:{line}: imports the private name {shown} from another package")
            if tunit != unit:
                graph.setdefault(unit, set()).add(tunit)
                if layers is not None and unit in layers and tunit in layers and layers[tunit] > layers[unit]:
                    problems.append(f"{where}:{line}: {unit} (layer {layers[unit]}) imports {target} "
                                    f"(layer {layers[tunit]}): imports run one way, downwards")
        if layers is not None and unit not in layers:
            problems.append(f"{where}: unit {unit!r} has no layer (add it to LAYERS and docs/architecture.md)")
    problems += [f"import cycle between packages: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return sorted(set(problems))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [[*c, c[0]] for c in comps]


def check_tests(tests_dir: Path) -> list[str]:
    """``sys.path`` edits in the tests (calls on it, assignments to it or its items)."""
    problems = []
    for path in sorted(tests_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if _is_sys_path(node) and _edited(node, tree):
                problems.append(f"{path.relative_to(tests_dir.parent)}:{node.lineno}: edits sys.path")
    return problems


def _is_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def _edited(node: ast.AST, tree: ast.AST) -> bool:
    for parent in ast.walk(tree):
        if isinstance(parent, ast.Attribute) and parent.value is node:  # sys.path.insert(...), .append ...
            return True
        if isinstance(parent, ast.Subscript) and parent.value is node and isinstance(parent.ctx, ast.Store | ast.Del):
            return True
        targets = getattr(parent, "targets", None) or [getattr(parent, "target", None)]
        if isinstance(parent, ast.Assign | ast.AugAssign | ast.AnnAssign) and node in targets:
            return True
    return False


# --- the real tree -----------------------------------------------------------------------------


def test_the_package_follows_the_rules():
    assert check_package(ROOT / "overlay", LAYER_OF) == []


def test_the_tests_do_not_edit_sys_path():
    assert check_tests(ROOT / "tests") == []


# --- each rule can fail --------------------------------------------------------------------------

CLEAN = {
    "pkg/__init__.py": "",
    "pkg/errors.py": "class Oops(Exception): pass\n",
    "pkg/core.py": "from pkg.errors import Oops\n_hidden = 1\n",
    "pkg/registry/__init__.py": "from pkg import core\n",
    "pkg/registry/impl.py": "from pkg.registry import _helpers\nfrom pkg.core import Oops\n",
    "pkg/registry/_helpers.py": "def _f(): pass\n",
    "pkg/controller/__init__.py": "from pkg.registry import impl\n",
    "pkg/cli.py": "import pkg.controller\nfrom pkg import __doc__\n",
}
SYNTH_LAYERS = {"pkg": 0, "errors": 0, "core": 1, "registry": 2, "controller": 3, "cli": 4}

VIOLATIONS = [
    ("registry imports controller", {"pkg/registry/impl.py": "def later():\n    from pkg.controller import x\n"},
     "registry imports pkg.controller"),
    ("private name across packages", {"pkg/cli.py": "from pkg.core import _hidden\n"},
     "imports the private name pkg.core._hidden from another package"),
    ("private module across packages", {"pkg/controller/__init__.py": "from pkg.registry import _helpers\n"},
     "imports the private name pkg.registry._helpers from another package"),
    ("cycle between packages", {"pkg/core.py": "def f():\n    import pkg.cli\n"},
     "import cycle between packages: cli -> controller -> core -> registry -> cli"),
    ("import up the layers", {"pkg/errors.py": "from . import core\n"}, "errors (layer 0) imports pkg.core (layer 1)"),
]


def _tree(base: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return base / "pkg"


def test_a_clean_synthetic_tree_passes(tmp_path):
    assert check_package(_tree(tmp_path, CLEAN), SYNTH_LAYERS) == []


@pytest.mark.parametrize("desc, change, expected", VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_each_rule_fails_on_a_synthetic_tree(tmp_path, desc, change, expected):
    problems = check_package(_tree(tmp_path, {**CLEAN, **change}), SYNTH_LAYERS)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("code", [
    "import sys\nsys.path.insert(0, '/x')\n",
    "import sys\nsys.path.append('/x')\n",
    "import sys\nsys.path = ['/x']\n",
    "import sys\nsys.path[0] = '/x'\n",
    "import sys\nsys.path += ['/x']\n",
])
def test_sys_path_edits_in_tests_are_found(tmp_path, code):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(code)
    assert check_tests(tmp_path / "tests") == ["tests/test_x.py:2: edits sys.path"]


def test_reading_sys_path_is_no_edit(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("import sys\nprint(sys.path[0], list(sys.path))\n")
    assert check_tests(tmp_path / "tests") == []
