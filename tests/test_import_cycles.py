"""No import cycle between the repository's files, read from the source (AST); test_layout.py checks the direction
of the imports between packages.

Every import counts, at module level or inside a function (a function-level import only postpones the cycle to the
first call). An import resolves to the file it names: `import a.b` and `from a.b import name` to a/b.py (or
a/b/__init__.py when a.b is a package); `from a import b` to a/b.py when b is a module, else to a/__init__.py, whose
name it reads; relative imports alike, counted from the importing file's package.

A package's own __init__.py: an edge from a file inside package P (at any depth) to P/__init__.py is dropped.
Python runs P/__init__.py before any file of P, so when such a file runs the __init__ has already started: the
import cannot run it again, only read the module already in sys.modules. Counting these edges would report every
package whose __init__ re-exports its files (infonoise/) as a cycle. `from P.x import y` is an edge to P/x.py only.
"""

import ast
import graphlib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('dnnlib', 'torch_utils', 'training', 'metrics', 'infonoise', 'bench', 'examples')
SCRIPTS = ('train', 'generate', 'fid', 'dataset_tool', 'diagnose')


def first_party(root: str) -> dict[str, str]:
    """Dotted module name -> path relative to `root` of every first-party file: the top-level scripts and the files
    of the top-level packages (folders with an __init__.py, so not tests/)."""
    files = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith('.py') and os.path.isfile(path):
            files[name[:-3]] = name
        elif not name.startswith('.') and os.path.isfile(os.path.join(path, '__init__.py')):
            for folder, dirs, names in os.walk(path):
                dirs[:] = [d for d in sorted(dirs) if os.path.isfile(os.path.join(folder, d, '__init__.py'))]
                for file in sorted(n for n in names if n.endswith('.py')):
                    relpath = os.path.relpath(os.path.join(folder, file), root)
                    parts = relpath[:-3].split(os.sep)
                    files['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = relpath
    return files


def imported_modules(node: ast.AST, package: str, files: dict[str, str]) -> list[str]:
    """The dotted names an import statement loads, resolved as the module docstring says (non-imports: none)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module
    if node.level:  # Level 1 is the file's own package, 2 its parent, ...
        parts = package.split('.')[: len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([node.module] if node.module else []))
    return [f'{base}.{alias.name}' if f'{base}.{alias.name}' in files else base for alias in node.names]


def import_graph(root: str) -> dict[str, dict[str, int]]:
    """File -> {first-party file it imports: line of the first such import}, for every first-party file."""
    files = first_party(root)
    graph = {}
    for module, path in files.items():
        with open(os.path.join(root, path), encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
        edges = graph.setdefault(path, {})
        for node in ast.walk(tree):
            for target in imported_modules(node, package, files):
                # Not itself, nor the __init__ of a package it belongs to (see the module docstring).
                if target in files and not (module == target or module.startswith(target + '.')):
                    edges[files[target]] = min(edges.get(files[target], node.lineno), node.lineno)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> str | None:
    """One import cycle as 'a.py:LINE -> b.py:LINE -> a.py' (at LINE each file imports the next), or None."""
    try:
        graphlib.TopologicalSorter({path: set(edges) for path, edges in graph.items()}).prepare()
    except graphlib.CycleError as e:
        cycle = e.args[1]
    else:
        return None
    if cycle[1] not in graph[cycle[0]]:  # graphlib lists the cycle against the import direction.
        cycle = cycle[::-1]
    first = cycle.index(min(cycle))  # Start at the first file by name, so the message does not vary from run to run.
    cycle = cycle[first:-1] + cycle[:first] + [cycle[first]]
    return ' -> '.join(f'{a}:{graph[a][b]}' for a, b in zip(cycle, cycle[1:])) + f' -> {cycle[-1]}'


def test_no_import_cycle_between_files():
    graph = import_graph(ROOT)
    expected = [f'{p}/__init__.py' for p in PACKAGES] + [f'{s}.py' for s in SCRIPTS]
    assert set(expected) <= set(graph), 'the scan misses first-party files'
    cycle = find_cycle(graph)
    assert cycle is None, f'Import cycle (file:line of each import): {cycle}'


def write_files(root, files: dict[str, str]) -> None:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)


def test_the_scan_resolves_imports_and_reports_a_cycle(tmp_path):
    write_files(tmp_path, {
        'tool.py': 'import os\nimport pkg.a\nfrom pkg import b, VERSION\n',
        'pkg/__init__.py': 'from pkg.a import f\nfrom . import b\nVERSION = 1\n',
        'pkg/a.py': 'import pkg\nfrom pkg import VERSION\nfrom pkg.b import g\n',  # Its package's __init__: dropped.
        'pkg/b.py': 'def g():\n    from .sub import c\n',  # Inside a function, relative.
        'pkg/sub/__init__.py': 'from ..a import f\n',
        'pkg/sub/c.py': 'from .. import a\n',
        'tests/test_x.py': 'import tool\n',  # Not a package: not scanned.
    })  # fmt: skip
    graph = import_graph(str(tmp_path))
    assert graph == {
        'tool.py': {'pkg/a.py': 2, 'pkg/b.py': 3, 'pkg/__init__.py': 3},
        'pkg/__init__.py': {'pkg/a.py': 1, 'pkg/b.py': 2},
        'pkg/a.py': {'pkg/b.py': 3},
        'pkg/b.py': {'pkg/sub/c.py': 2},
        'pkg/sub/__init__.py': {'pkg/a.py': 1},
        'pkg/sub/c.py': {'pkg/a.py': 1},
    }
    assert find_cycle({'x.py': {}, 'y.py': {'x.py': 1}}) is None
    # pkg/a.py imports pkg/b.py, whose g imports pkg/sub/c.py, which imports pkg/a.py.
    assert find_cycle(graph) == 'pkg/a.py:3 -> pkg/b.py:2 -> pkg/sub/c.py:1 -> pkg/a.py'
