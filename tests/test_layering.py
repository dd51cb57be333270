"""One-way imports: the package's subpackages form a stack, and imports only ever point down it.

Every import statement of every module of `ming_jax` (function bodies included) is parsed with `ast`, resolved to
a module of the package, and checked against `LAYERS` below:

  (a) a module may import modules of its own layer and of the layers listed before it, narrowed by the layer's
      `only` / `never` and widened by its `extra` (per-module) entries;
  (b) the module graph (every import, wherever it sits) has no cycle;
  (c) `ming_jax` modules are imported at module level, except in layers marked `lazy_ok` (the absl mains) and the
      few (importer, imported) pairs of `LAZY_IMPORTS_ALLOWED`, each with its reason.

The checker (`check_tree`) takes any package directory and layer list, and the tests at the bottom run it on small
synthetic trees to show that it does catch an upward import, a cycle, a lazy import and the `only` / `never`
rules, and passes a clean tree.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib
import textwrap

import pytest

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "ming_jax"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer: a subpackage of the root package (`""` is the root's own top-level modules).

    Module patterns (`only`, `never`, `extra` values) are dotted paths below the package root ("models.inputs"),
    matching that module and everything under it.
    """

    name: str
    only: tuple[str, ...] | None = None  # if set: the only other layers / modules this layer may import
    never: tuple[str, ...] = ()  # lower layers / modules this layer must not import all the same
    extra: tuple[tuple[str, str], ...] = ()  # (module of this layer, pattern) allowed on top of the order
    lazy_ok: bool = False  # function-level imports of package modules are fine here


# The declared import order, bottom first: a layer may import itself and any layer above it in this list.
LAYERS: list[Layer] = [
    # The root's __init__ (version only) sits under everything; the top-level shims may reach the CLIs.
    Layer("", extra=(("generate", "cli"), ("convert", "cli"), ("imagine", "cli"), ("tts", "cli"),
                     ("batch", "cli"))),
    Layer("config"),
    Layer("sharding"),
    Layer("pallas"),
    Layer("layers"),
    Layer("moe"),
    Layer("weights"),
    Layer("models"),
    # Weight-only int8 / fp8 quantization of the models' projections (the rules, quantize_model).
    Layer("quant"),
    # LoRA / QLoRA adapters (add / merge / remove) and their PEFT export (uses the weight tables).
    Layer("lora"),
    # Host-side preprocessing: numpy front ends, no model code.
    Layer("processors", only=("", "config", "models.inputs")),
    Layer("checkpoint"),
    Layer("gen"),
    # Training never depends on the generation pipelines (both sit on checkpoint; aot may use both).
    Layer("train", never=("gen",), extra=(("train.__main__", "cli"),)),
    Layer("aot", extra=(("aot.__main__", "cli"),)),
    Layer("parity", extra=(("parity.__main__", "cli"),)),
    # The absl mains import what a flag selects, inside the main.
    Layer("cli", lazy_ok=True),
]

# (importer, imported) module pairs, dotted from the root, that may be imported inside a function; reason each.
LAZY_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}


# --------------------------------------------------------------------------------------------------------- checker


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str  # dotted module name, package root included
    target: str  # the module it resolves to
    file: str  # path relative to the package's parent
    line: int
    lazy: bool  # inside a function body (not executed at import time)

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass
class Report:
    modules: dict[str, pathlib.Path]
    imports: list[Import]
    order: list[str]  # (a) imports against the declared order
    cycles: list[str]  # (b) one line per cycle
    lazy: list[str]  # (c) function-level imports not allowed
    unresolved: list[str]  # imports of package modules that do not exist / undeclared layers

    def ok(self) -> bool:
        return not (self.order or self.cycles or self.lazy or self.unresolved)


def _module_names(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    root = package_dir.name
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir).with_suffix("")
        parts = [root, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _walk(tree: ast.AST):
    """Yields (node, inside_function) for every import node, function bodies included."""
    stack = [(tree, False)]
    while stack:
        node, lazy = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def _imports(package_dir: pathlib.Path, modules: dict[str, pathlib.Path]) -> tuple[list[Import], list[str]]:
    root = package_dir.name
    imports, unresolved = [], []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        file = str(path.relative_to(package_dir.parent))
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, lazy in _walk(tree):
            wanted: list[tuple[str, str | None]] = []  # (module, member that may be a submodule)
            if isinstance(node, ast.Import):
                wanted = [(alias.name, None) for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_package else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                wanted = [(base, alias.name) for alias in node.names]
            for base, member in wanted:
                if base != root and not base.startswith(root + "."):
                    continue
                if member is not None and member != "*" and f"{base}.{member}" in modules:
                    target = f"{base}.{member}"
                elif base in modules:
                    target = base
                else:
                    unresolved.append(f"{file}:{node.lineno}: imports {base!r}, which is not a module of {root}")
                    continue
                imports.append(Import(name, target, file, node.lineno, lazy))
    # One entry per (file, line, target) (`from m import a, b` is one import of m), in file / line order.
    imports = sorted(set(imports), key=lambda imp: (imp.file, imp.line, imp.target))
    return imports, unresolved


def _rel(module: str, root: str) -> str:
    return "" if module == root else module[len(root) + 1:]


def _matches(rel: str, pattern: str) -> bool:
    if pattern == "":
        return rel == ""  # the root layer's pattern: the root __init__ only
    return rel == pattern or rel.startswith(pattern + ".")


def _layer_of(rel: str, layers: list[Layer]) -> int | None:
    """The layer of a module (dotted below the root): its first component, or the root layer for top-level modules."""
    names = [layer.name for layer in layers]
    head = rel.split(".")[0]
    if head not in names and "." not in rel:
        head = ""  # the root __init__ and top-level modules (generate.py, ...) form the root layer
    return names.index(head) if head in names else None


def _find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component that has one (Tarjan, iterative)."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(start):
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        scc.append(member)
                        if member == node:
                            break
                    sccs.append(scc)

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)

    cycles = []
    for scc in sccs:
        members = set(scc)
        first = min(scc)
        if len(scc) == 1 and first not in graph.get(first, ()):
            continue
        # Shortest path first -> ... -> first inside the component (BFS).
        parents, frontier, found = {first: None}, [first], None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                for child in sorted(graph.get(node, ())):
                    if child == first:
                        found = node
                        break
                    if child in members and child not in parents:
                        parents[child] = node
                        nxt.append(child)
                if found is not None:
                    break
            frontier = nxt
        path, node = [], found
        while node is not None:
            path.append(node)
            node = parents[node]
        cycles.append(path[::-1] + [first])
    return cycles


def check_tree(package_dir: pathlib.Path, layers: list[Layer] = LAYERS,
               lazy_allowed: dict[tuple[str, str], str] = LAZY_IMPORTS_ALLOWED) -> Report:
    """Parses every module under `package_dir` (a package folder) and checks its imports against `layers`."""
    package_dir = pathlib.Path(package_dir)
    root = package_dir.name
    modules = _module_names(package_dir)
    imports, unresolved = _imports(package_dir, modules)
    for name in modules:
        if _layer_of(_rel(name, root), layers) is None:
            unresolved.append(f"{modules[name].relative_to(package_dir.parent)}: module {name} is in no declared "
                              f"layer (add its subpackage to LAYERS)")

    order, lazy = [], []
    for imp in imports:
        src, dst = _rel(imp.importer, root), _rel(imp.target, root)
        i, j = _layer_of(src, layers), _layer_of(dst, layers)
        if i is None or j is None:
            continue
        layer = layers[i]
        src_layer, dst_layer = layer.name or "<root>", layers[j].name or "<root>"
        extra = any(_matches(src, mod) and _matches(dst, pat) for mod, pat in layer.extra)
        problem = None
        if i == j or extra:
            pass
        elif j > i:
            problem = f"upward import: layer {src_layer!r} may not import layer {dst_layer!r} (declared after it)"
        elif layer.only is not None and not any(_matches(dst, pat) for pat in layer.only):
            problem = (f"layer {src_layer!r} may import only {', '.join(repr(p or '<root>') for p in layer.only)}"
                       f" (and itself), not layer {dst_layer!r}")
        elif any(_matches(dst, pat) for pat in layer.never):
            problem = f"layer {src_layer!r} must never import {dst_layer!r}"
        if problem:
            order.append(f"{imp.where()}: {imp.importer} -> {imp.target}: {problem}")
        if imp.lazy and not layer.lazy_ok and (imp.importer, imp.target) not in lazy_allowed:
            lazy.append(f"{imp.where()}: {imp.importer} imports {imp.target} inside a function; move it to the "
                        f"module top (or allowlist the pair in LAZY_IMPORTS_ALLOWED with a reason)")

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for imp in imports:
        graph[imp.importer].add(imp.target)
    where = {}
    for imp in imports:
        where.setdefault((imp.importer, imp.target), imp.where())
    cycles = [" -> ".join(cycle) + "   [" + ", ".join(where[a, b] for a, b in zip(cycle, cycle[1:])) + "]"
              for cycle in _find_cycles(graph)]
    return Report(modules, imports, order, cycles, lazy, unresolved)


def _fail_if_any(title: str, lines: list[str]):
    if lines:
        pytest.fail(f"{len(lines)} {title}:\n  " + "\n  ".join(lines), pytrace=False)


# -------------------------------------------------------------------------------------------- the real package


@functools.cache
def _package_report() -> Report:
    return check_tree(PACKAGE_DIR)


def test_package_is_parsed():
    report = _package_report()
    assert "ming_jax.config.llm" in report.modules and "ming_jax.cli.generate" in report.modules
    assert any(imp.importer == "ming_jax.config" and imp.target == "ming_jax.config.base" for imp in report.imports)


def test_imports_resolve_and_every_module_has_a_layer():
    report = _package_report()
    _fail_if_any("unresolved imports / modules outside the declared layers", report.unresolved)


def test_imports_follow_the_declared_order():
    report = _package_report()
    order = " -> ".join(layer.name or "<root>" for layer in LAYERS)
    _fail_if_any(f"imports against the declared order ({order})", report.order)


def test_no_import_cycles():
    report = _package_report()
    _fail_if_any("import cycles", report.cycles)


def test_package_imports_are_module_level():
    report = _package_report()
    _fail_if_any("function-level imports of package modules outside cli/", report.lazy)


def test_lazy_allowlist_is_live_and_explained():
    used = {(imp.importer, imp.target) for imp in _package_report().imports if imp.lazy}
    for pair, reason in LAZY_IMPORTS_ALLOWED.items():
        assert reason.strip(), f"LAZY_IMPORTS_ALLOWED{pair} needs a reason"
        assert pair in used, f"LAZY_IMPORTS_ALLOWED{pair} is stale: no such function-level import any more"


# ----------------------------------------------------------------------------- the checker on synthetic trees


def _tree(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    package = tmp_path / "fakepkg"
    for rel, text in files.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for folder in [package, *[p for p in package.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return package


CLEAN = {
    "config/base.py": "X = 1\n",
    "config/llm.py": "from fakepkg.config.base import X\nfrom . import base\n",
    "models/inputs.py": "import fakepkg.config.llm\n",
    "models/llm.py": "from fakepkg.config import llm\nfrom fakepkg.models import inputs\n",
    "processors/prompt.py": "from fakepkg.models.inputs import *\nfrom fakepkg import config\n",
    "gen/text.py": "from fakepkg.models import llm\n",
    "aot/compile.py": "from fakepkg.gen import text\nfrom fakepkg.train import step\n",
    "aot/__main__.py": "from fakepkg.cli import aot\n",
    "train/step.py": "from ..models import llm\n",
    "cli/aot.py": "def run():\n    from fakepkg.aot import compile\n",
    "generate.py": "from fakepkg.cli import aot\n",
}


def test_checker_passes_a_clean_tree(tmp_path):
    report = check_tree(_tree(tmp_path, CLEAN))
    assert report.ok(), report
    targets = {(imp.importer, imp.target) for imp in report.imports}
    assert ("fakepkg.config.llm", "fakepkg.config.base") in targets  # `from . import base` resolved
    assert ("fakepkg.train.step", "fakepkg.models.llm") in targets  # `from ..models import llm` resolved
    assert ("fakepkg.processors.prompt", "fakepkg.config") in targets  # a subpackage by `from pkg import name`


def test_checker_catches_an_upward_import(tmp_path):
    report = check_tree(_tree(tmp_path, {**CLEAN, "config/base.py": "from fakepkg.models import llm\nX = 1\n"}))
    assert len(report.order) == 1, report
    assert "fakepkg/config/base.py:1" in report.order[0] and "'config' may not import layer 'models'" in \
        report.order[0]


def test_checker_catches_a_cycle(tmp_path):
    files = {**CLEAN, "models/inputs.py": "import fakepkg.config.llm\nfrom fakepkg.models.llm import X\n"}
    report = check_tree(_tree(tmp_path, files))
    assert not report.order and not report.lazy
    assert report.cycles == ["fakepkg.models.inputs -> fakepkg.models.llm -> fakepkg.models.inputs   "
                             "[fakepkg/models/inputs.py:2, fakepkg/models/llm.py:2]"]


def test_checker_catches_a_function_level_import(tmp_path):
    files = {**CLEAN, "gen/text.py": "def f():\n    from fakepkg.models import llm\n"}
    report = check_tree(_tree(tmp_path, files))
    assert len(report.lazy) == 1 and "fakepkg/gen/text.py:2" in report.lazy[0], report
    allowed = {("fakepkg.gen.text", "fakepkg.models.llm"): "optional heavy dependency"}
    assert check_tree(_tree(tmp_path, files), lazy_allowed=allowed).ok()


def test_checker_enforces_only_and_never(tmp_path):
    files = {**CLEAN, "processors/prompt.py": "from fakepkg.models import llm\n",
             "train/step.py": "import fakepkg.gen.text\n"}
    report = check_tree(_tree(tmp_path, files))
    assert len(report.order) == 2, report
    assert "may import only" in report.order[0] and "fakepkg/processors/prompt.py:1" in report.order[0]
    assert "'train' must never import 'gen'" in report.order[1]


def test_checker_flags_unknown_modules_and_layers(tmp_path):
    files = {**CLEAN, "gen/text.py": "from fakepkg.models.nothere import y\n", "extras/x.py": "\n"}
    report = check_tree(_tree(tmp_path, files))
    assert any("fakepkg.models.nothere" in line for line in report.unresolved)
    assert any("fakepkg.extras" in line and "no declared layer" in line for line in report.unresolved)


def test_checker_shims_are_the_only_way_down_to_cli(tmp_path):
    report = check_tree(_tree(tmp_path, {**CLEAN, "aot/compile.py": "from fakepkg.cli import aot\n"}))
    assert len(report.order) == 1 and "may not import layer 'cli'" in report.order[0], report
