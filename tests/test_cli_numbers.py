"""Every float option refuses NaN and ±inf with click's one-line usage error, before anything is written (click's own
FloatRange admits NaN through every bound check)."""

import os
import subprocess
import sys

import click
import pytest

from dnnlib.cli import FloatRange

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ('train.py', '--lr=nan'),
    ('train.py', '--duration=inf'),
    ('train.py', '--ema=nan'),
    ('train.py', '--info-beta=nan'),
    ('train.py', '--info-floor=nan'),
    ('train.py', '--info-sigma-max=inf'),
    ('generate.py', '--S_noise=nan'),
    ('generate.py', '--rho=nan'),
    ('generate.py', '--sigma_max=inf'),
    ('diagnose.py', '--sigma-min=nan'),
]


def test_absurd_noise_range_is_refused(tmp_path):
    # σ_max = 1e300 overflows float32 (σ² = inf): the run would train on NaN losses and exit 0.
    command = ['train.py', f'--outdir={tmp_path / "out"}', '--data=none.zip', '--dry-run', '--info-sigma-max=1e300']
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Invalid value for '--info-sigma-max'" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('script, option', CASES)
def test_non_finite_float_options_are_refused(script, option, tmp_path):
    name = option.split('=')[0]
    command = {
        'train.py': ['train.py', f'--outdir={tmp_path / "out"}', '--data=none.zip', '--dry-run'],
        'generate.py': ['generate.py', '--network=none.pt', f'--outdir={tmp_path / "out"}'],
        'diagnose.py': ['diagnose.py', 'bayes', '--data=none.zip', f'--out={tmp_path / "out.json"}'],
    }[script]
    result = subprocess.run([sys.executable, *command, option], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"Invalid value for '{name}'" in result.stderr and 'is not a finite number' in result.stderr
    assert 'Traceback' not in result.stderr and not list(tmp_path.iterdir())


def test_float_range_bounds_and_infinity():
    kind = FloatRange(min=0, allow_inf=True)
    assert kind.convert('inf', None, None) == float('inf') and kind.convert('2.5', None, None) == 2.5
    for value in ('nan', '-1'):
        with pytest.raises(click.BadParameter):
            kind.convert(value, None, None)
    with pytest.raises(click.BadParameter, match='not a finite number'):
        FloatRange().convert('-inf', None, None)


@pytest.mark.parametrize(
    'command',
    [
        ['train.py', '--data=none.zip', '--outdir={file}'],
        ['generate.py', '--network=none.pt', '--outdir={file}'],
        ['fid.py', 'ref', '--data=none.zip', '--dest={file}/ref.npz'],
    ],
)
def test_output_folder_that_is_a_file_is_refused(command, tmp_path):
    # A file where the output folder should be: one line before any work, not a traceback at the first write.
    file = tmp_path / 'taken'
    file.write_text('')
    args = [arg.format(file=file) for arg in command]
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f'"{file}" exists and is not a folder' in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr and sorted(p.name for p in tmp_path.iterdir()) == ['taken']
