"""Checkable facts about the shape of ``src/slmkit`` (issue 18), read from the source with :mod:`ast`.

Nothing under ``src/slmkit`` is imported or executed here: every module is parsed, its
``import`` statements are resolved to slmkit module names, and the facts are checked on
that graph and on the syntax tree's line numbers. Each check is a pure function over a
source tree, so the tests at the bottom also run it on a deliberately bad temporary tree
to show that it can fail.

Facts:

- no import cycles among slmkit modules (module-level imports, see :func:`import_cycles`);
- ``slmkit.models`` imports nothing from ``compress``, ``train``, ``runtime``, ``collab``;
- ``slmkit.trust`` and ``slmkit.collab`` import no concrete backend (only the Protocol in
  ``backends.base``, the streaming helpers and the ``backends.from_spec`` factory);
- no module imports a ``_private`` name (or a ``_private`` module) of another module, nor uses a
  private method or attribute that only classes of other modules define (``backend._encode_pair()``);
- no module over 600 lines, no function over 100 lines;
- only :mod:`slmkit.settings` (and the CLI, for its own variables) reads ``os.environ``;
- no block of six or more statements of the same shape in two places (:func:`repeated_blocks`);
- ``tests/`` mirrors ``src/slmkit``: every folder of tests is named after a package of ``src/slmkit``
  (cross-cutting tests sit at the top of ``tests/``).

Today's known breaks are listed exactly in the ``PENDING_*`` and ``*_ALLOWED`` sets below, each
with its reason: a new break fails, and so does a listed one that was fixed (so the lists only
shrink, and the suite stays green while issue 18 lands step by step).
"""

from __future__ import annotations

import ast
import collections
import copy
import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100

#: Modules of ``slmkit.backends`` that are the Protocol side (anyone may import them).
#: Every other module there is a concrete backend. A new file in backends/ must be named
#: in one of the two sets (``test_backends_classified``).
BACKEND_PROTOCOL = {"slmkit.backends", "slmkit.backends.base", "slmkit.backends.stream", "slmkit.backends.text"}
BACKEND_CONCRETE = {"slmkit.backends.hf", "slmkit.backends.hf_batch", "slmkit.backends.openai"}

#: Names the ``slmkit.backends`` package re-exports that are no concrete backend.
BACKEND_PACKAGE_OK = {"Backend", "Completion", "GenParams", "PartialFailure", "Prompt", "TokenScores",
                      "check_concurrency", "from_model", "from_spec", "is_endpoint"}

#: Today's known breaks, by exact finding (line numbers left out), each allowed only until its fix
#: lands (issue 18). A new finding fails, and so does an entry that is no longer found (delete it
#: then), so these lists can only shrink.
#: Circles closed only through function-local imports (no import-time failure, but still modules that
#: need each other; the pipeline runner <-> report one is cut): listed exactly, as above, except that a
#: listed circle may shrink while it is being cut. ``if TYPE_CHECKING:`` imports are no circle.
PENDING_LAZY_CYCLES: set[tuple[str, ...]] = set()
PENDING_LAYERING: set[str] = set()
PENDING_BACKENDS: set[str] = set()
PENDING_PRIVATE: set[str] = set()
#: Blocks of six statements or more of the same shape in two places (:func:`repeated_blocks`), same rule.
PENDING_REPEATS = {
    # ports of llama.cpp's make_qp_quants and make_q3_quants (ggml-quants.c), kept line for line comparable to it
    "slmkit.compress.kquant.make_qp_quants ~ slmkit.compress.kquant.make_q3_quants (7 statements)",
    # eval's own score record and the parse of llama-perplexity's output: one record would tie eval to export.llamacpp
    "slmkit.eval.heldout.Quality ~ slmkit.export.llamacpp.PerplexityResult (7 statements)",
}
#: Functions over 100 lines, same rule: exact names (runtime/ entries only while it is being split).
LONG_FUNCTIONS_ALLOWED: set[tuple[str, str]] = set()
#: Modules over 600 lines, same rule.
LONG_MODULES_ALLOWED: set[str] = set()


def assert_only_pending(findings: list[str], pending: set[str]) -> None:
    """``findings`` (compared without line numbers) are exactly the ``pending`` ones: no new break, no stale entry."""
    found = {re.sub(r":\d+ ", " ", f) for f in findings}
    assert sorted(found - pending) == [], "new findings"
    assert sorted(pending - found) == [], "fixed: delete these from the PENDING list"


@dataclasses.dataclass(frozen=True)
class Import:
    """One imported slmkit module (``target``) and, for ``from X import a``, the name ``a``."""

    source: str  # importing module
    target: str  # imported module (deepest module the statement names)
    name: str | None  # attribute imported from ``target`` (None: the module itself)
    line: int
    top_level: bool  # executed when ``source`` is imported (not inside a function)
    type_only: bool  # under ``if TYPE_CHECKING:`` (never executed)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_tree(root: Path) -> dict[str, tuple[Path, ast.Module, int]]:
    """``{module name: (path, syntax tree, line count)}`` for every .py file of the ``slmkit`` package under ``root``."""
    out = {}
    for path in sorted((root / "slmkit").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        out[module_name(path, root)] = (path, ast.parse(text, str(path)), len(text.splitlines()))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(node: ast.AST, in_function: bool, type_only: bool):
    """Yield ``(import node, top_level, type_only)`` for every import statement under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, not in_function, type_only
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk_imports(child, True, type_only)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk_imports(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
            for stmt in child.orelse:
                yield from _walk_imports(ast.Module(body=[stmt], type_ignores=[]), in_function, type_only)
        else:
            yield from _walk_imports(child, in_function, type_only)


def imports_of(name: str, path: Path, tree: ast.Module, modules: set[str]) -> list[Import]:
    """The slmkit imports of module ``name`` resolved against the known ``modules``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node, top, tonly in _walk_imports(tree, False, False):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "slmkit":
                    out.append(Import(name, alias.name, None, node.lineno, top, tonly))
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        if mod.split(".")[0] != "slmkit":
            continue
        for alias in node.names:
            sub = f"{mod}.{alias.name}"
            if sub in modules:  # ``from pkg import submodule``
                out.append(Import(name, sub, None, node.lineno, top, tonly))
            else:
                out.append(Import(name, mod, alias.name, node.lineno, top, tonly))
    return out


def all_imports(root: Path) -> tuple[dict, list[Import]]:
    tree = read_tree(root)
    modules = set(tree)
    imps = [i for name, (path, t, _) in tree.items() for i in imports_of(name, path, t, modules)]
    return tree, imps


def import_cycles(imps: list[Import]) -> list[list[str]]:
    """Strongly connected components (more than one module) of the module-level import graph.

    Only imports executed when the module is imported count: a function-local import runs
    when the function is called, after every module involved has finished initialising, so
    it cannot meet a half-initialised module; it is how a deliberate late binding is
    written (e.g. a heavy optional dependency). ``if TYPE_CHECKING:`` imports never run.
    An edge goes to the module the statement names, not to its parent packages: a package
    imported by its own submodule is already in ``sys.modules`` and is no cycle.
    """
    graph: dict[str, set[str]] = {}
    for i in imps:
        if i.top_level and not i.type_only and i.target != i.source:
            graph.setdefault(i.source, set()).add(i.target)
    # Tarjan's strongly connected components (iterative).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))
    return sorted(comps)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layering_breaks(imps: list[Import]) -> list[str]:
    """Imports (module-level or function-local: a lazy import is still a dependency) that cross a floor."""
    rules = [("slmkit.models", f"slmkit.{p}") for p in ("compress", "train", "runtime", "collab")]
    out = []
    for i in imps:
        for low, high in rules:
            if _within(i.source, low) and _within(i.target, high):
                out.append(f"{i.source}:{i.line} imports {i.target} ({low} must not depend on {high})")
    return out


def concrete_backend_uses(imps: list[Import], concrete: set[str], package_ok: set[str]) -> list[str]:
    """Imports of a concrete backend from ``slmkit.trust`` or ``slmkit.collab``."""
    out = []
    for i in imps:
        if not (_within(i.source, "slmkit.trust") or _within(i.source, "slmkit.collab")):
            continue
        if any(_within(i.target, c) for c in concrete):
            out.append(f"{i.source}:{i.line} imports {i.target}{'.' + i.name if i.name else ''}")
        elif i.target == "slmkit.backends" and i.name and i.name not in package_ok:
            out.append(f"{i.source}:{i.line} imports slmkit.backends.{i.name}")
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(tree: dict, imps: list[Import]) -> list[str]:
    """``from other import _name``, ``other._name`` on an imported module, and private modules used outside their package."""
    out = []
    for i in imps:
        if i.target == i.source:
            continue
        if i.name is not None and _private(i.name):
            out.append(f"{i.source}:{i.line} imports {i.target}.{i.name}")
        last = i.target.rpartition(".")[2]
        owner = i.target.rpartition(".")[0]
        if _private(last) and not _within(i.source, owner):
            out.append(f"{i.source}:{i.line} imports private module {i.target} from outside {owner}")
    # ``import slmkit.x as m`` / ``from slmkit import x`` then ``m._name``
    for name, (_, t, _) in tree.items():
        aliases = {}
        for i in imps:
            if i.source == name and i.name is None:
                aliases[i.target.rpartition(".")[2]] = i.target
        for node in ast.walk(t):
            for alias in getattr(node, "names", []) if isinstance(node, (ast.Import, ast.ImportFrom)) else []:
                if alias.asname and f"{getattr(node, 'module', None) or ''}.{alias.name}".lstrip(".") in tree:
                    aliases[alias.asname] = f"{node.module}.{alias.name}" if getattr(node, "module", None) else alias.name
                elif alias.asname and alias.name in tree:
                    aliases[alias.asname] = alias.name
        for node in ast.walk(t):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr) and aliases[node.value.id] != name):
                out.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(set(out))


def private_members(tree: dict) -> list[str]:
    """``obj._name`` (not on ``self`` / ``cls``) in one module, where ``_name`` is a private method or
    attribute that only classes of other slmkit modules define (e.g. ``backend._encode_pair()``)."""
    owners: dict[str, set[str]] = {}
    for name, (_, t, _) in tree.items():
        for cls in (n for n in ast.walk(t) if isinstance(n, ast.ClassDef)):
            for node in ast.walk(cls):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(node.name):
                    owners.setdefault(node.name, set()).add(name)
                elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr)
                      and isinstance(node.value, ast.Name) and node.value.id == "self"):
                    owners.setdefault(node.attr, set()).add(name)
    out = []
    for name, (_, t, _) in tree.items():
        for node in ast.walk(t):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and node.attr in owners
                    and name not in owners[node.attr]
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                out.append(f"{name}:{node.lineno} uses {'/'.join(sorted(owners[node.attr]))} private member {node.attr}")
    return sorted(set(out))


def long_modules(tree: dict, limit: int = MAX_MODULE_LINES) -> dict[str, int]:
    return {name: n for name, (_, _, n) in tree.items() if n > limit}


def long_functions(tree: dict, limit: int = MAX_FUNCTION_LINES) -> dict[tuple[str, str], int]:
    """``{(module, qualified function name): lines}`` for every def (methods and nested defs too) over ``limit``."""
    out = {}

    def visit(node: ast.AST, module: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    n = child.end_lineno - child.lineno + 1
                    if n > limit:
                        out[(module, qual)] = n
                visit(child, module, qual + ".")
            else:
                visit(child, module, prefix)

    for name, (_, t, _) in tree.items():
        visit(t, name, "")
    return out


MIN_REPEAT = 6  #: statements in a row that make a repeated block (issue 18: "six or more lines of the same shape")


class _Shape(ast.NodeTransformer):
    """A statement's shape: variable and argument names become ``_``, literals their type, annotations go;
    attribute names and the names of called functions stay (``torch.linalg.cholesky(_)`` is not ``f(_)``)."""

    def visit_Name(self, node):
        return ast.Name(id="_", ctx=node.ctx)

    def visit_Call(self, node):
        func = node.func
        self.generic_visit(node)
        if isinstance(func, ast.Name):
            node.func = ast.Name(id=func.id, ctx=ast.Load())
        return node

    def visit_arg(self, node):
        return ast.arg(arg="_")

    def visit_Constant(self, node):
        return ast.Constant(value=f"<{type(node.value).__name__}>")

    def visit_JoinedStr(self, node):
        return ast.Constant(value="<f-string>")


_BODIES = ("body", "handlers", "orelse", "finalbody", "cases")


def statement_shapes(tree: ast.Module, module: str) -> list[list[tuple[str, int, str]]]:
    """Sequences of ``(shape, line, where)``: one for the module's own statements and one per class or def body,
    nested blocks flattened in source order (a nested def or class is a sequence of its own). Imports and
    docstrings are left out. A field of a class body (``x: int = 0``) keeps its names, so that two dataclasses
    match only when they declare the same fields, not merely as many of them."""
    seqs: list[list[tuple[str, int, str]]] = []

    def add(stmts, seq, where: str, in_class: bool) -> None:
        for s in stmts:
            if isinstance(s, (ast.Import, ast.ImportFrom)) or (
                    isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)):
                continue
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                seqs.append(inner := [])
                add(s.body, inner, f"{where}.{s.name}", isinstance(s, ast.ClassDef))
                continue
            if in_class and isinstance(s, (ast.Assign, ast.AnnAssign)):
                field = copy.deepcopy(s)
                for c in ast.walk(field):
                    if isinstance(c, ast.Constant):
                        c.value = f"<{type(c.value).__name__}>"
                seq.append((ast.dump(field, annotate_fields=False), s.lineno, where))
                continue
            head = copy.copy(s)  # the statement without its nested blocks
            for f in _BODIES:
                if hasattr(head, f):
                    setattr(head, f, [])
            seq.append((ast.dump(_Shape().visit(copy.deepcopy(head)), annotate_fields=False), s.lineno, where))
            for f in _BODIES:
                for sub in getattr(s, f, None) or []:
                    if isinstance(sub, (ast.ExceptHandler, ast.match_case)):
                        seq.append((f"{type(sub).__name__}", getattr(sub, "lineno", s.lineno), where))
                        add(sub.body, seq, where, False)
                    else:
                        add([sub], seq, where, False)

    seqs.append(top := [])
    add(tree.body, top, module, False)
    return seqs


def repeated_blocks(tree: dict, min_len: int = MIN_REPEAT) -> list[str]:
    """``"a.f:12 ~ b.g:40 (7 statements)"`` for each maximal run of ``min_len`` or more statements of the same shape
    (:func:`statement_shapes`) found in two places: two modules, two functions, or two non-overlapping places in one."""
    seqs = [seq for name, (_, t, _) in tree.items() for seq in statement_shapes(t, name)]
    where: dict[tuple[str, ...], list[tuple[int, int]]] = collections.defaultdict(list)
    for k, seq in enumerate(seqs):
        for i in range(len(seq) - min_len + 1):
            where[tuple(shape for shape, _, _ in seq[i:i + min_len])].append((k, i))
    runs: dict[tuple[int, int, int], list[int]] = collections.defaultdict(list)  # (seq a, seq b, offset) -> starts in a
    for places in where.values():
        for x, (ka, ia) in enumerate(places):
            for kb, ib in places[x + 1:]:
                if ka != kb or abs(ia - ib) >= min_len:
                    runs[(ka, kb, ia - ib)].append(ia)
    out = set()
    for (ka, kb, off), starts in runs.items():
        starts.sort()
        first = 0
        for n, i in enumerate(starts):
            if n + 1 < len(starts) and starts[n + 1] == i + 1:
                continue  # the run goes on
            i0 = starts[first]
            first = n + 1
            (_, la, a), (_, lb, b) = seqs[ka][i0], seqs[kb][i0 - off]
            out.add(f"{a}:{la} ~ {b}:{lb} ({i - i0 + min_len} statements)")
    return sorted(out)


# --------------------------------------------------------------------------- the facts on src/

@pytest.fixture(scope="module")
def src():
    return all_imports(SRC)


def test_no_import_cycles(src):
    _, imps = src
    assert import_cycles(imps) == []


def test_lazy_import_cycles_only_pending(src):
    """The same check counting function-local imports too: a circle that only a late import keeps working."""
    _, imps = src
    lazy = [dataclasses.replace(i, top_level=True) for i in imps]
    found = [set(c) for c in import_cycles(lazy)]
    # a listed circle may shrink while it is being cut (a found one inside it is fine)
    assert [sorted(f) for f in found if not any(f <= set(p) for p in PENDING_LAZY_CYCLES)] == [], "new circles"
    assert sorted(p for p in PENDING_LAZY_CYCLES if not any(f <= set(p) for f in found)) == [], \
        "cut: delete these from PENDING_LAZY_CYCLES"


def test_models_is_a_floor(src):
    _, imps = src
    assert_only_pending(layering_breaks(imps), PENDING_LAYERING)


def test_backends_classified(src):
    tree, _ = src
    backends = {m for m in tree if _within(m, "slmkit.backends")}
    assert backends == BACKEND_PROTOCOL | BACKEND_CONCRETE, "name each backends/ module in BACKEND_PROTOCOL or BACKEND_CONCRETE"


def test_trust_and_collab_see_only_the_backend_protocol(src):
    _, imps = src
    assert_only_pending(concrete_backend_uses(imps, BACKEND_CONCRETE, BACKEND_PACKAGE_OK), PENDING_BACKENDS)


def test_no_private_names_across_modules(src):
    tree, imps = src
    assert_only_pending(private_imports(tree, imps) + private_members(tree), PENDING_PRIVATE)


def test_repeated_blocks_only_pending(src):
    tree, _ = src
    assert_only_pending(repeated_blocks(tree), PENDING_REPEATS)


def test_no_long_modules(src):
    tree, _ = src
    long = long_modules(tree)
    assert set(long) - LONG_MODULES_ALLOWED == set(), f"modules over {MAX_MODULE_LINES} lines: {long}"
    assert LONG_MODULES_ALLOWED - set(long) == set(), "no longer long: remove from LONG_MODULES_ALLOWED"


def test_no_long_functions(src):
    tree, _ = src
    long = long_functions(tree)
    assert set(long) - LONG_FUNCTIONS_ALLOWED == set(), f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert LONG_FUNCTIONS_ALLOWED - set(long) == set(), "no longer long: remove from LONG_FUNCTIONS_ALLOWED"


#: Modules that may touch ``os.environ`` besides slmkit.settings: the CLI (SLMKIT_LOG, SLMKIT_DEBUG, SLMKIT_PROGRESS and
#: TOKENIZERS_PARALLELISM at the edge) and a copy of the whole environment for a benchmark subprocess.
ENVIRON_ALLOWED = {"slmkit.settings", "slmkit.cli", "slmkit.cli.progress", "slmkit.eval.gguf_speed"}


def environment_reads(tree: dict) -> list[str]:
    """``module:line`` for each ``os.environ`` / ``os.getenv`` use (``os.environ.setdefault``, a write, excepted) and each
    ``from os import environ/getenv`` outside :data:`ENVIRON_ALLOWED`."""
    out = []
    for name, (_, t, _) in tree.items():
        if name in ENVIRON_ALLOWED:
            continue
        writes = {id(n.value) for n in ast.walk(t) if isinstance(n, ast.Attribute) and n.attr == "setdefault"}
        for n in ast.walk(t):
            if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "os"
                    and n.attr in ("environ", "getenv", "environb") and id(n) not in writes):
                out.append(f"{name}:{n.lineno} reads os.{n.attr}")
            elif isinstance(n, ast.ImportFrom) and n.module == "os" and {a.name for a in n.names} & {"environ", "getenv"}:
                out.append(f"{name}:{n.lineno} imports os.environ/getenv")
    return sorted(out)


def test_environment_read_only_in_settings(src):
    tree, _ = src
    assert environment_reads(tree) == [], "read environment variables through slmkit.settings"


def unmirrored_test_dirs(tests: Path, src: Path) -> list[str]:
    """Folders under ``tests`` holding test modules that are not named after a package of ``src/slmkit``."""
    packages = {p.parent.name for p in (src / "slmkit").glob("*/__init__.py")}
    dirs = {p.parent.relative_to(tests).parts[0] for p in tests.glob("*/**/test_*.py")}
    return sorted(d for d in dirs if d not in packages)


def test_tests_mirror_src():
    assert unmirrored_test_dirs(Path(__file__).resolve().parent, SRC) == []


# --------------------------------------------------------------------------- the checks can fail

def test_environment_reads_are_found(tmp_path):
    root = _write(tmp_path, {"__init__.py": "", "settings.py": "import os\nX = os.environ.get('A')\n",
                             "models/__init__.py": "", "models/zoo.py": "import os\n\ndef f():\n    return os.getenv('B')\n",
                             "export/x.py": "import os\nos.environ.setdefault('LIB', 'x')\nY = os.environ['C']\n",
                             "data/p.py": "from os import environ\n"})
    tree, _ = all_imports(root)
    assert environment_reads(tree) == ["slmkit.data.p:1 imports os.environ/getenv", "slmkit.export.x:3 reads os.environ",
                                       "slmkit.models.zoo:4 reads os.getenv"]


def test_unmirrored_test_dirs_are_named(tmp_path):
    _write(tmp_path / "src", {"__init__.py": "", "rag/__init__.py": "", "train/__init__.py": ""})
    for rel in ("test_cli.py", "rag/test_rag.py", "enhance/test_enhance_sft.py", "enhance/deep/test_x.py"):
        (tmp_path / "tests" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tests" / rel).write_text("")
    assert unmirrored_test_dirs(tmp_path / "tests", tmp_path / "src") == ["enhance"]


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "slmkit" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def bad_tree(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    return _write(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/load.py": "def load():\n    from slmkit.compress.packed import read\n    return read()\n",
        "compress/__init__.py": "from slmkit.compress import prune\n",
        "compress/packed.py": "from ..models import load\n\ndef read():\n    pass\n",
        "compress/prune.py": "from slmkit.compress.structured import depth\n",
        "compress/structured.py": "import slmkit.compress.prune as p\n\ndef depth():\n    return p._helper\n",
        "backends/__init__.py": "from slmkit.backends.hf import HFBackend\n",
        "backends/hf.py": "class HFBackend:\n    def _encode_pair(self):\n        return self._encode_pair()\n\ndef _encode(x):\n    return x\n",
        "trust/__init__.py": "",
        "trust/common.py": "from slmkit.backends import HFBackend\nfrom slmkit.backends.hf import _encode\n\ndef f(b):\n    return b._encode_pair()\n",
        "collab/__init__.py": "",
        "collab/late.py": "def f():\n    import slmkit.trust.common\n",
        "trust/late.py": "import slmkit.collab.late\n",
        "cli/__init__.py": "",
        "cli/_common.py": "",
        "rag/__init__.py": "from slmkit.cli._common import x\n",
        "big.py": "def long():\n" + body + "\n" + "\n" * MAX_MODULE_LINES,
    })


def test_checks_fail_on_a_bad_tree(bad_tree):
    tree, imps = all_imports(bad_tree)
    # prune <-> structured at module level; models.load -> compress.packed is lazy (no edge),
    # compress.packed -> models.load is module level; trust.late -> collab.late is module
    # level but collab.late -> trust.common is function-local: no cycle.
    assert import_cycles(imps) == [["slmkit.compress.prune", "slmkit.compress.structured"]]
    lazy = [dataclasses.replace(i, top_level=True) for i in imps]
    assert import_cycles(lazy) == [["slmkit.compress.packed", "slmkit.models.load"],
                                   ["slmkit.compress.prune", "slmkit.compress.structured"]]
    assert layering_breaks(imps) == [
        "slmkit.models.load:2 imports slmkit.compress.packed (slmkit.models must not depend on slmkit.compress)"]
    assert concrete_backend_uses(imps, {"slmkit.backends.hf"}, BACKEND_PACKAGE_OK) == [
        "slmkit.trust.common:1 imports slmkit.backends.HFBackend",
        "slmkit.trust.common:2 imports slmkit.backends.hf._encode"]
    assert private_imports(tree, imps) == [
        "slmkit.compress.structured:4 uses slmkit.compress.prune._helper",
        "slmkit.rag:1 imports private module slmkit.cli._common from outside slmkit.cli",
        "slmkit.trust.common:2 imports slmkit.backends.hf._encode"]
    assert private_members(tree) == ["slmkit.trust.common:5 uses slmkit.backends.hf private member _encode_pair"]
    assert long_modules(tree) == {"slmkit.big": MAX_FUNCTION_LINES + 1 + MAX_MODULE_LINES}
    assert long_functions(tree) == {("slmkit.big", "long"): MAX_FUNCTION_LINES + 1}


def test_repeated_blocks_are_found(tmp_path):
    body = """
        def {name}(path, what):
            {p} = Path(path)
            if not {p}.is_file():
                raise DataError(f"{{what}} {{{p}}} does not exist")
            try:
                text = {p}.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{{{p}}} is not UTF-8 ({{err.reason}})") from None
            if not text.strip():
                raise DataError("{msg}")
            return text
    """
    body = textwrap.dedent(body)
    five = "\n\ndef short(a):\n    b = a + 1\n    c = b * 2\n    d = c - 3\n    e = d / 4\n    return e\n"
    fields = "\n\nclass {cls}:\n" + "".join(f"    {{f}}{i}: int = {i}\n" for i in range(8))
    root = _write(tmp_path, {
        "__init__.py": "",
        "a.py": body.format(name="read_a", p="p", msg="empty") + five + fields.format(cls="ConfA", f="x"),
        "b.py": "X = 1\n" + body.format(name="read_b", p="path", msg="no text") + five.replace("short", "brief")
                + fields.format(cls="ConfB", f="y") + fields.format(cls="ConfC", f="x"),
    })
    tree, _ = all_imports(root)
    # same shape with other names and messages; a 5-statement copy is too short; dataclasses match by their fields
    assert repeated_blocks(tree) == ["slmkit.a.ConfA:24 ~ slmkit.b.ConfC:36 (8 statements)",
                                     "slmkit.a.read_a:3 ~ slmkit.b.read_b:4 (10 statements)"]
    assert_only_pending(repeated_blocks(tree), {"slmkit.a.ConfA ~ slmkit.b.ConfC (8 statements)",
                                                "slmkit.a.read_a ~ slmkit.b.read_b (10 statements)"})


def test_private_module_inside_its_package_is_fine(tmp_path):
    root = _write(tmp_path, {"__init__.py": "", "cli/__init__.py": "", "cli/_common.py": "def helper():\n    pass\n",
                             "cli/verb.py": "from slmkit.cli._common import helper\nfrom . import _common\n"})
    tree, imps = all_imports(root)
    assert private_imports(tree, imps) == []
    assert import_cycles(imps) == []


def test_pending_lists_only_shrink():
    pending = {"slmkit.a imports slmkit.b"}
    assert_only_pending(["slmkit.a:3 imports slmkit.b"], pending)
    with pytest.raises(AssertionError, match="new findings"):
        assert_only_pending(["slmkit.a:3 imports slmkit.b", "slmkit.c:1 imports slmkit.d"], pending)
    with pytest.raises(AssertionError, match="delete these"):
        assert_only_pending([], pending)
