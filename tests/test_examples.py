"""The three examples run as a user runs them (a fresh interpreter, from another directory), tiny, on CPU, and
InfoNoise adapts in each: a refresh is reported and the samples are written."""

import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_INFONOISE = ['--bins=4', '--min-count=2']


def run_example(name: str, args: list[str], cwd) -> str:
    path = os.path.join(ROOT, 'examples', name)
    result = subprocess.run(
        [sys.executable, path, *args], cwd=cwd, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, OMP_NUM_THREADS='1'),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize(
    'name, args, expect',
    [
        (
            'edm_loop.py',
            ['--steps=24', '--warmup-steps=4', '--refresh-steps=4', '--nfe-steps=3'],
            'on InfoGrid (3 Heun',
        ),
        ('ddpm_epsilon.py', ['--steps=24', '--warmup-steps=4', '--refresh-steps=4', '--ddim-steps=3'], 'DDIM 3 steps'),
        ('rectified_flow.py', ['--kimg=0.384', '--refresh-kimg=0.064', '--steps=3'], '3 Euler steps'),
    ],
)
def test_example_runs_and_infonoise_refreshes(name, args, expect, digits_zip, tmp_path):
    out = tmp_path / 'samples.png'
    stdout = run_example(name, [f'--data={digits_zip}', f'--out={out}', '--batch=16', *TINY_INFONOISE, *args], tmp_path)
    assert 'InfoNoise refresh 1 at' in stdout  # The refresh callback's line: InfoNoise adapted.
    assert f'Wrote {out}: 64 samples' in stdout and expect in stdout
    assert Image.open(out).size == (8 * 8, 8 * 8)


def test_examples_say_when_the_data_is_missing(tmp_path):
    path = os.path.join(ROOT, 'examples', 'ddpm_epsilon.py')
    result = subprocess.run([sys.executable, path, '--data=nope.zip'], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and '--data: no such file "nope.zip"' in result.stderr
    assert not list(tmp_path.iterdir())
