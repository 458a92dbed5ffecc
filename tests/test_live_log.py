"""Live training curves: per-σ-interval losses in stats.jsonl, train.py --tensorboard (event files read back with
tensorboard's EventAccumulator; skipped without the package) and `python -m tools.plot_stats`."""

import importlib.util
import json
import math
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_NET_ARGS

import train
from tools import plot_stats
from training import live_log

HAVE_TENSORBOARD = importlib.util.find_spec('tensorboard') is not None
INFONOISE = ['--sampler=infonoise', '--info-bins=8', '--info-nmin=1', '--info-warmup=0', '--info-refresh=0.064']


@pytest.fixture(scope='module')
def info_run(tmp_path_factory, digits_zip):
    """A tiny InfoNoise run of 2016 images in ticks of 1 kimg (with --tensorboard if the package is there)."""
    out = tmp_path_factory.mktemp('runs')
    args = ['--outdir', out, '--data', digits_zip, '--device=cpu', '--workers=0', *TINY_NET_ARGS, '--batch=32',
            '--duration=0.002', '--tick=1', '--lr-rampup=0', '--seed=1', '--snap=100', '--dump=100', *INFONOISE]  # fmt: skip
    if HAVE_TENSORBOARD:
        args.append('--tensorboard')
    result = CliRunner().invoke(train.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return next(out.iterdir())


def test_sigma_bins_sum_and_count_on_the_device():
    bins = live_log.SigmaBinLoss(torch.device('cpu'), edges=(0.002, 1.0, 80.0))
    bins.add(torch.tensor([0.5, 2.0, 0.001, 100.0]), torch.tensor([1.0, 3.0, 5.0, 7.0])[:, None].repeat(1, 4))
    assert bins.sums.tolist() == [[6.0, 10.0], [2.0, 2.0]]  # Out-of-range σ counts in the end intervals.


def test_stats_jsonl_holds_per_sigma_loss_and_lr(info_run):
    lines = [json.loads(line) for line in open(info_run / 'stats.jsonl')]
    assert len(lines) == 3
    names = [name for name in lines[-1] if name.startswith('Loss/sigma/')]
    assert names and all(name in [live_log.sigma_bin_name(*e) for e in zip(live_log.SIGMA_BIN_EDGES, live_log.SIGMA_BIN_EDGES[1:])] for name in names)  # fmt: skip
    # One mean per interval and tick (report0), finite and positive.
    assert all(lines[-1][name]['num'] == 1 and 0 < lines[-1][name]['mean'] < math.inf for name in names)
    lr = json.load(open(info_run / 'training_options.json'))['optimizer_kwargs']['lr']
    assert lines[-1]['Progress/lr']['mean'] == pytest.approx(lr)
    assert lines[-1]['Noise/refreshes']['mean'] >= 1


@pytest.mark.skipif(not HAVE_TENSORBOARD, reason='tensorboard not installed (requirements-extras.txt)')
def test_tensorboard_events_hold_the_scalars_and_the_profile(info_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [name for name in os.listdir(info_run) if name.startswith('events.out.tfevents.')]
    assert len(events) == 1
    acc = EventAccumulator(str(info_run), size_guidance={'images': 0, 'scalars': 0})
    acc.Reload()
    scalars = acc.Tags()['scalars']
    for tag in ('Loss/loss', 'Progress/lr', 'Timing/img_per_sec', 'Noise/pivot', 'Noise/refreshes'):
        assert tag in scalars, (tag, scalars)
    assert any(tag.startswith('Loss/sigma/') for tag in scalars)
    assert [e.step for e in acc.Scalars('Loss/loss')] == [32, 1056, 2016]  # x axis: images seen.
    stats = [json.loads(line)['Loss/loss']['mean'] for line in open(info_run / 'stats.jsonl')]
    assert np.allclose([e.value for e in acc.Scalars('Loss/loss')], stats, rtol=1e-6)
    assert 'Noise/profile' in acc.Tags()['images'] and len(acc.Images('Noise/profile')) >= 1


def test_tensorboard_missing_is_one_line(tmp_path, digits_zip, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'tensorboard' else real(name, *a))
    args = ['--outdir', tmp_path, '--data', digits_zip, '--device=cpu', *TINY_NET_ARGS, '--tensorboard']
    result = CliRunner().invoke(train.main, [str(a) for a in args])
    assert result.exit_code == 1 and 'Traceback' not in result.output
    assert result.output == f'Error: --tensorboard needs the tensorboard package: pip install {live_log.TENSORBOARD_PIN} (see requirements-extras.txt)\n'  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_plot_stats_draws_a_png(info_run, tmp_path):
    out = tmp_path / 'curves.png'
    assert plot_stats.main([str(info_run), f'--out={out}']) == 0
    with PIL.Image.open(out) as image:
        assert image.size[0] > 600 and image.size[1] > 400
    curves = plot_stats.read_curves(str(info_run / 'stats.jsonl'))
    assert curves['kimg'].tolist() == pytest.approx([0.032, 1.056, 2.016])
    assert np.all(np.isfinite(curves['Noise/pivot'][-1:]))
    assert plot_stats.main([str(info_run)]) == 0 and (info_run / 'stats.png').is_file()  # Default: beside the stats.
    assert plot_stats.main([str(tmp_path / 'none')]) == 1
