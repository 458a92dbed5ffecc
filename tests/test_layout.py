"""The import rules of DESIGN.md, read from the source (AST): arrows run downward only."""

import ast
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = {
    'training',
    'metrics',
    'infonoise',
    'train',
    'generate',
    'fid',
    'dataset_tool',
    'diagnose',
    'bench',
    'examples',
    'tools',
}
CLIS_AND_SCRIPTS = {'train', 'generate', 'fid', 'dataset_tool', 'diagnose', 'bench', 'examples', 'tools'}


def imported_packages(path: str) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of the file (relative imports: its package)."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    package = os.path.relpath(os.path.dirname(path), ROOT).split(os.sep)[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else node.module.split('.')[0])
    return names


def imported_modules(path: str, package: str = '') -> set[str]:
    """Dotted names of every module `path` imports, at any depth of the file, and of every string constant that is a
    dotted name (class_name='training.loss.EDMLoss', importlib): `from a import b` gives a and a.b, as b may be a
    module; relative imports resolve against `package`."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split('.') if node.level else []
            base = '.'.join(parts[: len(parts) - node.level + 1])
            module = '.'.join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f'{module}.{alias.name}' for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r'[A-Za-z_]\w*(\.\w+)+', node.value):
                names.add(node.value)
    return names


def names_module(names: set[str], module: str) -> bool:
    """Whether `module` or anything inside it is among the dotted `names`."""
    return any(name == module or name.startswith(module + '.') for name in names)


def modules(package: str) -> list[str]:
    folder = os.path.join(ROOT, package)
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith('.py'))


@pytest.mark.parametrize('package', ['torch_utils', 'dnnlib'])
def test_plumbing_imports_nothing_upward(package):
    for path in modules(package):
        assert not imported_packages(path) & PIPELINE, path


@pytest.mark.parametrize('package', ['training', 'torch_utils', 'dnnlib', 'infonoise'])
def test_nothing_below_the_clis_imports_metrics(package):
    # metrics/ (detectors, Fréchet distance) sits beside training/: the pipeline must train without it.
    for path in modules(package):
        assert 'metrics' not in imported_packages(path), path


def test_metrics_imports_no_cli_or_script():
    for path in modules('metrics'):
        assert not imported_packages(path) & CLIS_AND_SCRIPTS, path


def test_training_loop_does_not_name_the_library():
    assert 'infonoise' not in imported_packages(os.path.join(ROOT, 'training', 'training_loop.py'))


@pytest.mark.parametrize('name', ['networks.py', 'networks_1d.py'])
def test_networks_never_import_the_loss(name):
    # A network is built and run without a loss (generation, EDM pickles, the meta-device shape check); the loss calls
    # the network, never the reverse.
    names = imported_modules(os.path.join(ROOT, 'training', name), 'training')
    assert not names_module(names, 'training.loss'), sorted(names)


def test_networks_do_not_import_the_1d_networks():
    # networks_1d imports networks and adds SequenceUNet to networks.MODEL_TYPES: the reverse import would be a cycle.
    names = imported_modules(os.path.join(ROOT, 'training', 'networks.py'), 'training')
    assert not names_module(names, 'training.networks_1d'), sorted(names)


def test_library_imports_only_torch_numpy_and_the_standard_library():
    allowed = {'torch', 'numpy', 'infonoise', *sys.stdlib_module_names}
    for path in modules('infonoise'):
        extra = {'matplotlib'} if os.path.basename(path) == 'plots.py' else set()
        assert imported_packages(path) <= allowed | extra, (path, imported_packages(path) - allowed - extra)


def test_tools_read_run_directories_without_the_pipeline():
    # tools/ (python -m tools.plot_stats) reads files a run wrote; it needs no torch and no part of the pipeline.
    allowed = {'numpy', 'matplotlib', *sys.stdlib_module_names}
    for path in modules('tools'):
        assert imported_packages(path) <= allowed, (path, imported_packages(path) - allowed)


def test_the_scan_sees_imports(tmp_path):
    # The scan can fail: a function-level import of the pipeline is found.
    path = tmp_path / 'module.py'
    path.write_text('import os\n\ndef f():\n    from training import networks\n    import dnnlib.util\n')
    assert imported_packages(str(path)) == {'os', 'training', 'dnnlib'}
    path.write_text('if True:\n    from metrics.frechet import frechet_distance\n')
    assert imported_packages(str(path)) == {'metrics'}


def test_the_module_scan_sees_loss_imports(tmp_path):
    # The finer scan can fail too: every way of reaching training.loss below is found.
    cases = [
        ('def f():\n    from training import loss\n', ''),
        ('import training.loss as L\n', ''),
        ('from .loss import EDMLoss\n', 'training'),
        ('from . import loss\n', 'training'),
        ("import dnnlib\nnet = dnnlib.util.construct_class_by_name(class_name='training.loss.EDMLoss')\n", ''),
    ]
    path = tmp_path / 'module.py'
    for text, package in cases:
        path.write_text(text)
        assert names_module(imported_modules(str(path), package), 'training.loss'), text
    path.write_text('from training import networks, lossy\nx = "training.lossy"\n')
    assert not names_module(imported_modules(str(path)), 'training.loss')
