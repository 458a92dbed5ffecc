"""Packaging: the wheel holds the library `infonoise` alone, and it imports from a clean venv without the repository.

The EDM pipeline (train.py, generate.py, fid.py, dataset_tool.py, training/, metrics/, dnnlib/, torch_utils/) runs
from the checkout and must not be installed. The wheel is built offline (no build isolation: the venv's pinned
setuptools) from a copy of the repository without its virtualenv, data and outputs, so that the build neither writes
build/ or *.egg-info into the checkout nor picks up stale files from a previous build there.
"""

import email.parser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NAME, VERSION = 'infonoise', '0.1.0'
DIST_INFO = f'{NAME}-{VERSION}.dist-info'
PIPELINE = ('train', 'generate', 'fid', 'dataset_tool', 'training', 'metrics', 'dnnlib', 'torch_utils')
NOT_IN_WHEEL = (*PIPELINE, 'configs', 'tests', 'bench', 'docs', 'diagnose')

# Top-level entries of the checkout that are not source (virtualenvs, data, outputs, caches, build products).
SKIP_TOP = {'.git', '.venv', 'venv', 'datasets', 'runs', 'out', 'fid-refs', 'bench-out', 'build', 'dist'}


def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == '__pycache__' or n.endswith(('.pyc', '.egg-info')) or n.startswith('.')}
    if Path(directory).resolve() == REPO:
        skip |= SKIP_TOP & set(names)
    return skip


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTHON', 'PIP_', 'VIRTUAL_ENV'))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK='1', PIP_NO_INPUT='1')
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, **kwargs)
    assert result.returncode == 0, f'{cmd} failed:\n{result.stdout}\n{result.stderr}'
    return result


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the repository, offline, with the venv's setuptools."""
    tmp = tmp_path_factory.mktemp('packaging')
    src = tmp / 'src'
    shutil.copytree(REPO, src, ignore=_ignore)
    out = tmp / 'wheelhouse'
    offline = ['--no-deps', '--no-build-isolation', '--no-index']
    _run([sys.executable, '-m', 'pip', 'wheel', str(src), *offline, '-w', str(out)])
    wheels = list(out.glob('*.whl'))
    assert [w.name for w in wheels] == [f'{NAME}-{VERSION}-py3-none-any.whl']
    return wheels[0]


def _read(wheel: Path, name: str | None = None) -> list[str] | bytes:
    """The wheel's file list, or the bytes of one of its files."""
    with zipfile.ZipFile(wheel) as z:
        return z.namelist() if name is None else z.read(name)


def test_wheel_holds_only_the_library(wheel):
    names = _read(wheel)
    print('\n'.join(['', f'{wheel.name}:', *names]))
    outside = [n for n in names if not n.startswith((f'{NAME}/', f'{DIST_INFO}/'))]
    assert not outside, f'files outside {NAME}/ and {DIST_INFO}/: {outside}'
    tops = {n.split('/')[0].removesuffix('.py') for n in names}
    assert not tops & set(NOT_IN_WHEEL)
    assert not any(n.endswith('.pyc') or '__pycache__' in n for n in names)
    for name in ('LICENSE', 'NOTICE'):
        assert _read(wheel, f'{DIST_INFO}/licenses/{name}') == (REPO / name).read_bytes(), name


def test_wheel_holds_every_library_module(wheel):
    names = set(_read(wheel))
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / NAME).rglob('*.py') if '__pycache__' not in p.parts}
    assert f'{NAME}/__init__.py' in modules
    assert modules <= names, f'missing from the wheel: {sorted(modules - names)}'


def test_wheel_metadata(wheel):
    meta = email.parser.Parser().parsestr(_read(wheel, f'{DIST_INFO}/METADATA').decode())
    assert meta['Name'] == NAME and meta['Version'] == VERSION
    assert meta['License-Expression'] == 'Apache-2.0'
    assert sorted(meta.get_all('License-File')) == ['LICENSE', 'NOTICE']
    assert meta['Requires-Python'] == '>=3.10'
    requires = meta.get_all('Requires-Dist')
    assert 'torch>=2.1' in requires
    assert 'numpy' in requires
    assert 'matplotlib>=3.6; extra == "plots"' in requires
    assert 'diffusers>=0.42.1; extra == "diffusers"' in requires
    assert 'tensorboard>=2.20.0; extra == "tensorboard"' in requires
    assert not [r for r in requires if '==' in r.split(';')[0]], f'pinned requirements: {requires}'
    assert meta.get_all('Provides-Extra') == ['plots', 'diffusers', 'tensorboard']


IMPORT_CHECK = """
import importlib, sys
from pathlib import Path

venv, version, absent = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3:]
import infonoise
assert Path(infonoise.__file__).resolve().is_relative_to(venv), infonoise.__file__
assert infonoise.__version__ == version, infonoise.__version__
from infonoise import InfoNoise, LogNormal, LogUniform, edm_grid, infogrid
for name in absent:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    raise AssertionError(f'{name} is importable from the clean venv')
print('ok', infonoise.__file__)
"""


def test_wheel_imports_in_a_clean_venv(wheel, tmp_path):
    # torch and numpy come from the test's own site-packages through a .pth file; that directory must not hold the
    # pipeline or an install of this repository, or the imports below would prove nothing.
    outer = Path(torch.__file__).resolve().parent.parent
    for name in (*PIPELINE, NAME):
        assert not (outer / name).exists() and not (outer / f'{name}.py').exists(), outer / name
    assert not list(outer.glob('__editable__*')) and not list(outer.glob('*.egg-link'))
    for pth in outer.glob('*.pth'):
        assert str(REPO) not in pth.read_text(errors='replace'), pth
    assert not list(outer.glob(f'*{NAME}*')), f'{NAME} is installed in {outer}'

    venv = tmp_path / 'venv'
    _run([sys.executable, '-m', 'venv', str(venv)])
    python = venv / 'bin' / 'python'
    _run([str(python), '-m', 'pip', 'install', '--no-deps', '--no-index', str(wheel)])
    site = Path(_run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).stdout.strip())
    assert site.resolve() != Path(sysconfig.get_paths()['purelib']).resolve()
    (site / '_outer_site_packages.pth').write_text(f'{outer}\n')

    # -I: no PYTHONPATH, user site or script directory on sys.path; cwd outside the repository.
    result = _run([str(python), '-I', '-c', IMPORT_CHECK, str(venv), VERSION, *PIPELINE], cwd=tmp_path)
    assert result.stdout.startswith('ok ')
