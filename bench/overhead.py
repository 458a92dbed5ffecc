"""What InfoNoise and the evaluation tools cost (docs/results.md, "Overhead"): four timings on one machine, in one
run.

(a) Training-step time of each training noise sampler divided by EDM's log-normal: the demo network (DDPM++,
    0.75 M parameters, 16x16, batch 64), real steps (σ draw, loss, backward, Adam, observe), blocks alternating
    between the noise samplers so that drifts of the machine hit all alike, InfoNoise refreshing every 10 steps
    (`bench.sampler_overhead`). The paper's target for InfoNoise is a ratio of at most 1.01.
(b) The noise samplers alone: `sample` + `observe` per step at batch sizes 64 to 4096 (InfoNoise with the library
    defaults, K = 64 intervals and B = 256, drawing from its table after a refresh, no refresh falling due), and the
    time of one InfoNoise refresh.
(c) Generation throughput of the demo network with EDM's Heun solver (18 steps = 35 NFE), in images/s.
(d) The Fréchet distance of D = 2048 statistics: eigen-decompositions (metrics.frechet) against EDM's
    scipy.linalg.sqrtm (`bench.frechet`).

Budget (2 CPU cores): about 3 minutes; --quick about 30 s (its numbers are rough).

    python -m bench.overhead --outdir=bench-out/overhead
"""

import os
import statistics
import time

import click
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import dnnlib
from bench import frechet as fd_bench
from bench.common import apply_quick, generate_uint8, markdown_table, run_record, sync, write_json
from bench.sampler_overhead import demo_network, make_samplers, time_sampler_work, time_training
from dnnlib.cli import pick_device
from infonoise.grids import edm_grid
from infonoise.info_noise import InfoNoise
from infonoise.samplers import LogNormal, LogUniform
from metrics.frechet import frechet_distance

SAMPLERS = ('lognormal', 'loguniform', 'infonoise')
QUICK = dict(rounds=2, steps=3, sampler_steps=20, gen_images=16, fd_dim=256)


def step_ratios(blocks: dict[str, list[float]], work: dict[str, float]) -> dict:
    """Each noise sampler's training-step time over log-normal's: the ratio of the median block times, the quartiles of
    the ratios of blocks run in the same round (pairs share the machine's state), and the ratio implied by the
    noise samplers' own work alone, which is precise where whole steps are noisy."""
    median = {name: statistics.median(times) for name, times in blocks.items()}
    base = median['lognormal']
    paired = {
        name: np.quantile(np.array(times) / np.array(blocks['lognormal']), [0.25, 0.5, 0.75]).tolist()
        for name, times in blocks.items()
    }
    from_work = {name: (base - work['lognormal'] + seconds) / base for name, seconds in work.items()}
    return dict(
        median_seconds=median,
        ratio={name: t / base for name, t in median.items()},
        paired_ratio_quartiles=paired,
        ratio_from_sampler_work=from_work,
    )


def refreshed_infonoise(device, endpoint: str = 'continuous') -> InfoNoise:
    """InfoNoise with default settings after one refresh from full buffers (losses of a Gaussian source with
    σ_data = 0.5), whose next refresh never falls due; `endpoint` picks the pivot rule."""
    sampler = InfoNoise(weight='edm', refresh_kimg=1e9, warmup_kimg=0, endpoint=endpoint)
    source = LogUniform()
    for _ in range(8):
        sigma = source.sample(8192, device)
        sampler.observe(sigma, 0.25 * sigma**2 / (0.25 + sigma**2))
    if not sampler.refresh():
        raise RuntimeError('InfoNoise did not refresh from full buffers')
    return sampler


def sampler_microbench(batch_sizes: list[int], num_steps: int, device) -> dict:
    """Seconds per `sample` + `observe` step of each noise sampler at each batch size, and of one InfoNoise refresh with
    each pivot rule (onset for continuous endpoints, power-law break for discrete ones)."""
    per_step = {name: [] for name in SAMPLERS}
    for batch in batch_sizes:
        samplers = {'lognormal': LogNormal(), 'loguniform': LogUniform(), 'infonoise': refreshed_infonoise(device)}
        time_sampler_work(samplers, batch, 5, device)  # Warm up.
        for name, seconds in time_sampler_work(samplers, batch, num_steps, device).items():
            per_step[name].append(seconds)
    refresh_seconds = {}
    for endpoint in ('continuous', 'discrete'):
        sampler, refresh = refreshed_infonoise(device, endpoint), []
        for _ in range(max(num_steps // 10, 3)):
            start = time.perf_counter()
            sampler.refresh()
            sync(device)
            refresh.append(time.perf_counter() - start)
        refresh_seconds[endpoint] = statistics.median(refresh)
    return dict(batch_sizes=batch_sizes, seconds_per_step=per_step, refresh_seconds=refresh_seconds)


def generation_speed(num_images: int, device) -> dict:
    """Images/s of the demo network with EDM's Heun solver on its 18-step (35 NFE) σ-grid."""
    net = demo_network(device).eval().requires_grad_(False)
    generate_uint8(net, [0, 1], edm_grid(2), 'heun', False, device)  # Warm up.
    sync(device)
    start = time.perf_counter()
    generate_uint8(net, list(range(num_images)), edm_grid(18), 'heun', False, device)
    sync(device)
    seconds = time.perf_counter() - start
    return dict(images=num_images, nfe=35, seconds=seconds, images_per_sec=num_images / seconds)


def frechet_speed(dim: int, num_samples: int) -> dict:
    """Seconds of EDM's sqrtm-based FID and of ours on the same random D-dimensional statistics."""
    stats = fd_bench.random_stats(np.random.default_rng(0), dim, num_samples)
    stats += fd_bench.random_stats(np.random.default_rng(1), dim, num_samples)
    ref, t_scipy = fd_bench.timed(lambda: fd_bench.scipy_fid(*stats), 1)
    ours, t_ours = fd_bench.timed(lambda: frechet_distance(*stats), 1)
    return dict(
        dim=dim, samples=num_samples, scipy_seconds=t_scipy, eigh_seconds=t_ours, speedup=t_scipy / t_ours,
        relative_difference=abs(ours - ref) / abs(ref),
    )  # fmt: skip


def plot(train: dict, micro: dict, path: str) -> None:
    """Left: per-block training-step times; right: the noise samplers' own time per step against batch size."""
    fig = Figure(figsize=(10.4, 4.2))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for i, times in enumerate(train['block_seconds'].values()):
        left.plot(np.full(len(times), i), np.array(times) * 1e3, 'o', alpha=0.6)
    left.set_xticks(range(len(train['block_seconds'])), list(train['block_seconds']))
    left.set(ylabel='ms per training step', title=f'Training step, batch {train["batch"]} (blocks)')
    for name, seconds in micro['seconds_per_step'].items():
        right.plot(micro['batch_sizes'], np.array(seconds) * 1e3, marker='o', label=name)
    right.set(xscale='log', yscale='log', xlabel='batch size', ylabel='ms per step', title='sample + observe alone')
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3, which='both')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(train: dict, micro: dict, generation: dict, frechet: dict, device) -> list[str]:
    """The four Markdown tables (or lines)."""
    headers = ['sampler', 'ms/step', 'ratio to log-normal', 'paired ratio: median [IQR]', 'sampler work', 'its ratio']
    rows = [
        [
            name,
            f'{train["median_seconds"][name] * 1e3:.2f}',
            f'{train["ratio"][name]:.4f}',
            '{1:.3f} [{0:.3f}, {2:.3f}]'.format(*train['paired_ratio_quartiles'][name]),
            f'{train["sampler_work_seconds"][name] * 1e3:.3f} ms',
            f'{train["ratio_from_sampler_work"][name]:.4f}',
        ]
        for name in SAMPLERS
    ]
    step = (
        f'**(a) Training step**, {train["network"]}, {train["parameters"]:,} parameters, batch {train["batch"]}, '
        f'{device}; median of {train["rounds"]} alternating blocks of {train["steps_per_block"]} steps; InfoNoise '
        f'refreshing every {train["infonoise_refresh_steps"]} steps ({train["infonoise_refreshes"]} refreshes); '
        f'"its ratio": log-normal\'s step with its sampler work replaced by this sampler\'s\n\n'
    ) + markdown_table(headers, rows)
    samplers = (
        f'**(b) Samplers alone**, `sample` + `observe` per step in µs (InfoNoise K = 64, B = 256, after a refresh); '
        f'one InfoNoise refresh: {micro["refresh_seconds"]["continuous"] * 1e3:.2f} ms (onset pivot), '
        f'{micro["refresh_seconds"]["discrete"] * 1e3:.2f} ms (power-law break)\n\n'
    ) + markdown_table(
        ['sampler', *[f'batch {b}' for b in micro['batch_sizes']]],
        [[name, *[f'{s * 1e6:.0f}' for s in micro['seconds_per_step'][name]]] for name in SAMPLERS],
    )
    return [
        step,
        samplers,
        f'**(c) Generation**, demo network, Heun 18 steps (35 NFE): {generation["images"]} images in '
        f'{generation["seconds"]:.1f} s = {generation["images_per_sec"]:.1f} images/s',
        f'**(d) Fréchet distance**, D = {frechet["dim"]}: scipy sqrtm {frechet["scipy_seconds"]:.2f} s, eigh '
        f'{frechet["eigh_seconds"]:.2f} s, speed-up {frechet["speedup"]:.2f}×, relative difference '
        f'{frechet["relative_difference"]:.1e}',
    ]


# fmt: off
@click.command(context_settings={'show_default': True})
@click.option('--outdir',        help='Where results.json and overhead.png go', metavar='DIR', default=os.path.join('bench-out', 'overhead'))
@click.option('--quick',         help='Short run that checks the machinery (about 30 s); rough numbers', is_flag=True)
@click.option('--device',        help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']))
@click.option('--rounds',        help='(a) timed blocks per noise sampler', metavar='N', type=click.IntRange(min=1), default=20)
@click.option('--steps',         help='(a) training steps per block', metavar='N', type=click.IntRange(min=1), default=10)
@click.option('--sampler-steps', help='(b) timed steps per noise sampler and batch size', metavar='N', type=click.IntRange(min=1), default=200)
@click.option('--batch-sizes',   help='(b) batch sizes', metavar='LIST', type=dnnlib.util.parse_int_list, default='64,256,1024,4096')
@click.option('--gen-images',    help='(c) images generated', metavar='N', type=click.IntRange(min=1), default=256)
@click.option('--fd-dim',        help='(d) feature dimension D', metavar='D', type=click.IntRange(min=2), default=2048)
# fmt: on
def main(**kwargs):
    """Training-step ratio of each noise sampler to log-normal, sampler-only and refresh times, generation images/s,
    and Fréchet-distance time against scipy's sqrtm. Defaults: about 3 minutes on 2 CPU cores; --quick: 30 s."""
    start_time = time.time()
    opts = dnnlib.EasyDict(kwargs)
    if opts.quick:
        apply_quick(click.get_current_context(), opts, QUICK)
    if 0 in opts.batch_sizes:
        raise click.ClickException('--batch-sizes: every batch size must be positive')
    device = pick_device(opts.device)
    os.makedirs(opts.outdir, exist_ok=True)
    batch, refresh_steps = 64, 10

    click.echo('(a) training steps...')
    net = demo_network(device)
    samplers = make_samplers(SAMPLERS, batch, refresh_steps)
    blocks = time_training(net, samplers, batch, opts.steps, opts.rounds, device)
    work = time_sampler_work(samplers, batch, opts.rounds * opts.steps, device)
    train = dict(
        network='EDMPrecond/SongUNet (demo-mnist16)', parameters=sum(p.numel() for p in net.parameters()),
        resolution=16, batch=batch, steps_per_block=opts.steps, rounds=opts.rounds, block_seconds=blocks,
        sampler_work_seconds=work, infonoise_refresh_steps=refresh_steps,
        infonoise_refreshes=samplers['infonoise'].refreshes, **step_ratios(blocks, work),
    )  # fmt: skip
    click.echo('(b) samplers alone...')
    micro = sampler_microbench(opts.batch_sizes, opts.sampler_steps, device)
    click.echo('(c) generation...')
    generation = generation_speed(opts.gen_images, device)
    click.echo('(d) Fréchet distance...')
    frechet = frechet_speed(opts.fd_dim, max(5 * opts.fd_dim, 1000))

    png = os.path.join(opts.outdir, 'overhead.png')
    plot(train, micro, png)
    results = dict(
        benchmark='overhead', train_step=train, sampler_only=micro, generation=generation, frechet=frechet, plot=png,
        settings=dict(quick=opts.quick), run=run_record('bench.overhead', start_time, device),
    )  # fmt: skip
    write_json(os.path.join(opts.outdir, 'results.json'), results)

    tables = report(train, micro, generation, frechet, device)
    click.echo('\n' + '\n\n'.join(tables))
    click.echo(f'\nWrote {opts.outdir}/results.json and {png} ({results["run"]["wall_seconds"]:.0f} s)')


if __name__ == '__main__':
    main()
