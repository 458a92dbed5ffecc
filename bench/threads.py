"""Training speed against torch's CPU threads on a quiet and on a busy machine: the demo recipe (DDPM++, 0.75 M
parameters, MNIST-5k at 16x16, batch 64) trained by train.py with torch's default (one thread per CPU:
OMP_NUM_THREADS set to the CPU count), with train.py's own choice (no OMP_NUM_THREADS: the CPUs other programs
leave free, torch_utils.misc.set_cpu_threads) and with one thread. "Busy" runs spinning processes beside it, one per
CPU but one, as a second job on the machine would. Each run's speed is the median img/s of its ticks after the
first, printed as a ratio to torch's default in the same condition.

    python -m bench.threads --outdir=bench-out/threads          # about 6 minutes on 2 cores

Run it alone: other work on the machine is exactly what it measures.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time

import click

from bench.common import DEFAULT_DATA, REPO_ROOT, apply_quick, ensure_dataset, markdown_table, write_json
from training import run_dir as run_files

SETTINGS = {'torch default': 'cpus', 'train.py (free CPUs)': None, 'one thread': '1'}


def train_speed(data: str, outdir: str, kimg: float, threads: str | None) -> tuple[float, str]:
    """Median img/s over the ticks after the first of one short demo run, and the threads train.py reported."""
    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    if threads is not None:
        env['OMP_NUM_THREADS'] = str(os.cpu_count()) if threads == 'cpus' else threads
    command = [sys.executable, 'train.py', f'--outdir={outdir}', '--nosubdir', f'--data={data}', '--device=cpu',
               '--preset=demo-mnist16', f'--duration={kimg / 1000}', '--tick=1', '--snap=1000', '--dump=1000',
               '--snap-grid=0', '--seed=0']  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f'train.py failed: {result.stderr.strip().splitlines()[-1]}')
    with open(os.path.join(outdir, run_files.STATS), encoding='utf-8') as f:
        rates = [r['Timing/img_per_sec']['mean'] for r in map(json.loads, f) if r['Progress/tick']['mean'] > 0]
    said = re.search(r'CPU threads:\s+(.*)', result.stdout)
    return statistics.median(rates), said.group(1) if said else '?'


@click.command()
@click.option('--outdir', help='Where to write results.json and the runs', metavar='DIR', default='bench-out/threads')
@click.option('--data', help='MNIST-5k at 16x16 (built if missing)', metavar='ZIP', default=DEFAULT_DATA)
@click.option('--kimg', help='Images per run', metavar='KIMG', type=click.IntRange(min=1), default=6)
@click.option('--quick', help='A 1-kimg run per setting (rough numbers, for tests)', is_flag=True)
def main(**opts):
    """Training img/s with torch's default threads, train.py's choice and one thread, quiet and busy."""
    ctx = click.get_current_context()
    if opts['quick']:
        apply_quick(ctx, opts, dict(kimg=1))
    ensure_dataset(opts['data'], ('--source=mnist5k', '--resolution=16x16'))
    rows, results = [], {}
    for condition in ('quiet', 'busy'):
        spinners = []
        if condition == 'busy':
            spin = [sys.executable, '-c', 'while True: pass']
            spinners = [subprocess.Popen(spin) for _ in range(max((os.cpu_count() or 1) - 1, 1))]
            time.sleep(2)  # Let them settle on their cores.
        try:
            for name, threads in SETTINGS.items():
                out = os.path.join(opts['outdir'], 'runs', f'{condition}-{name.split()[0]}')
                speed, said = train_speed(opts['data'], out, opts['kimg'], threads)
                results[f'{condition}/{name}'] = dict(img_per_sec=speed, threads=said)
        finally:
            for proc in spinners:
                proc.kill()
                proc.wait()
        base = results[f'{condition}/torch default']['img_per_sec']
        for name in SETTINGS:
            r = results[f'{condition}/{name}']
            rows.append([condition, name, r['threads'].split(' (')[0], f'{r["img_per_sec"]:.1f}',
                         f'{r["img_per_sec"] / base:.2f}'])  # fmt: skip
    write_json(os.path.join(opts['outdir'], 'results.json'), dict(cpus=os.cpu_count(), kimg=opts['kimg'], **results))
    print(markdown_table(['machine', 'threads', 'count', 'img/s', 'vs torch default'], rows))


if __name__ == '__main__':
    main()
