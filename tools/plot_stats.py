"""Training curves of a run as one PNG: `python -m tools.plot_stats RUN_DIR [--out=PNG]`.

Reads RUN_DIR/stats.jsonl (one line per tick, each statistic's mean) and draws over kimg: the training loss (and the
loss per σ-interval, where recorded), the learning rate, images per second and, for InfoNoise, the gate pivot c with
its refreshes. Without --out the PNG is RUN_DIR/stats.png. Needs matplotlib (the `plots` extra).
"""

import argparse
import json
import os
import sys

import numpy as np

CURVES = ('Loss/loss', 'Progress/lr', 'Timing/img_per_sec', 'Noise/pivot', 'Noise/refreshes')


def read_curves(path: str) -> dict[str, np.ndarray]:
    """kimg and every statistic's per-tick mean (NaN where a tick lacks it) from a stats.jsonl."""
    with open(path, encoding='utf-8') as f:
        lines = [json.loads(line) for line in f if line.strip()]
    names = sorted({name for line in lines for name, value in line.items() if isinstance(value, dict)})
    curves = {name: np.array([line.get(name, {}).get('mean', np.nan) for line in lines], dtype=float) for name in names}
    curves['kimg'] = curves.get('Progress/kimg', np.arange(len(lines), dtype=float))
    return curves


def draw(curves: dict[str, np.ndarray], title: str, out: str) -> None:
    """The four panels: loss (and per-σ losses), learning rate, img/s, InfoNoise pivot (with refreshes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kimg = curves['kimg']
    fig = Figure(figsize=(12, 7.5), dpi=100, layout='constrained')
    FigureCanvasAgg(fig)
    (loss, lr), (speed, pivot) = fig.subplots(2, 2, sharex=True)
    fig.suptitle(title)
    bins = [name for name in curves if name.startswith('Loss/sigma/')]
    bins.sort(key=lambda name: float(name.split('/')[-1].split('-')[0]))
    for i, name in enumerate(bins):
        loss.plot(kimg, curves[name], lw=1, color=f'C{i % 10}', alpha=0.6, label=f'σ in {name.split("/")[-1]}')
    if 'Loss/loss' in curves:
        loss.plot(kimg, curves['Loss/loss'], color='k', lw=2, label='loss (all σ)')
    loss.set_yscale('log')
    loss.set_title('Training loss')
    loss.legend(fontsize=7, ncols=2)
    for ax, name, label in ((lr, 'Progress/lr', 'learning rate'), (speed, 'Timing/img_per_sec', 'images per second')):
        if name in curves:
            ax.plot(kimg, curves[name], color='C0')
        ax.set_title(label)
    if 'Noise/pivot' in curves:
        pivot.plot(kimg, curves['Noise/pivot'], color='C1', marker='.', label='pivot c')
        pivot.set_yscale('log')
        refreshes = curves.get('Noise/refreshes')
        if refreshes is not None:
            twin = pivot.twinx()
            twin.step(kimg, refreshes, where='post', color='0.5', ls='--', label='refreshes')
            twin.set_ylabel('refreshes')
        pivot.set_title('InfoNoise pivot c (σ)')
    else:
        pivot.text(0.5, 0.5, 'no InfoNoise pivot in this run', ha='center', va='center', transform=pivot.transAxes)
        pivot.set_title('InfoNoise pivot')
    for ax in (speed, pivot):
        ax.set_xlabel('kimg')
    fig.savefig(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m tools.plot_stats', description=__doc__.splitlines()[0])
    parser.add_argument('run_dir', metavar='RUN_DIR', help='training run directory holding stats.jsonl')
    parser.add_argument('--out', metavar='PNG', help='output PNG  [default: RUN_DIR/stats.png]')
    args = parser.parse_args(argv)
    path = os.path.join(args.run_dir, 'stats.jsonl')
    if not os.path.isfile(path):
        print(f'Error: no stats.jsonl in "{args.run_dir}"', file=sys.stderr)
        return 1
    try:
        curves = read_curves(path)
    except (OSError, ValueError) as e:
        print(f'Error: cannot read "{path}": {e}', file=sys.stderr)
        return 1
    out = args.out or os.path.join(args.run_dir, 'stats.png')
    draw(curves, os.path.basename(os.path.normpath(args.run_dir)), out)
    print(out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
