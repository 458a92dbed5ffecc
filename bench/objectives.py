"""Noise samplers under three training objectives: does InfoNoise help rectified flow, DDPM and EDM alike (issue 23)?

Each objective trains the same small DDPM++ U-Net (EDM's SongUNet, 16 channels, 0.19 M parameters) on MNIST-5k
16x16 with the same optimiser (Adam 2e-3), batch (32), EMA and horizon (rf 12, ddpm 20, edm 15 kEx) for every noise
sampler (`--schedules`), and evaluates the EMA network every third of the horizon by FD-MNIST of --samples samples
(the same latents for every noise sampler of a seed) against all training digits:

- `rf`: rectified flow as examples/rectified_flow.py (velocity loss; Euler on a uniform t grid, --nfe steps);
- `ddpm`: DDPM ε-prediction with linear β from 1e-4 to 0.02, T = 1000, as examples/ddpm_epsilon.py (DDIM η = 0,
  --nfe steps);
- `edm`: EDM's preconditioned denoiser and loss weight as examples/edm_loop.py (Heun on EDM's ρ = 7 grid, --nfe/2
  steps, --nfe − 1 evaluations).

Noise samplers (`make_schedule`): `default` (rf: logit-normal(0, 1), SD3's; ddpm: uniform timesteps; edm: EDM's
log-normal(−1.2, 1.2)); `uniform` (rf: uniform t; edm: log-uniform σ on [0.002, 80]; ddpm: the default already);
`infonoise` (the library's InfoNoise through the objective's adapter); `infonoise-paper` (its pre-fix build,
build='paper'); `oracle` (a law fixed from the held-out error of the training set's exact Bayes denoiser at the
grid's centres, capped by σ², `infonoise.oracles.empirical_bayes_mse(held_out=True)`: no estimation noise, no
memorisation collapse); and the variants `projection` (onto log-normals), `tempered` (π ∝ base^½·π_info^½, the
geometric midpoint, not tuned), `excess` (the loss above the training set's own exact Bayes error, Xu et al.) and
`bounded` (the loss capped by σ²v/(σ² + v), v the images' mean per-pixel variance).

Every cell (objective, noise sampler, seed) is cached in OUT/runs.json, so an interrupted benchmark resumes, and
`--jobs` runs cells in parallel processes. The report (OUT/objectives.md, printed): per objective, final FD mean
over seeds with its 95 % bootstrap interval, its ratio to the default's, and the kEx each noise sampler needs to
reach the default's final mean FD (`bench.seeds`); OUT/objectives.png draws the FD curves and the learned laws.

Measured on 2 CPU cores, two cells at once: a cell takes about 65 s (rf), 80 s (ddpm), 75 s (edm), half of it the
three evaluations; the 115 cells of the defaults about 75 minutes.

    OMP_NUM_THREADS=1 python -m bench.objectives --out=bench-out/objectives --jobs=2
    python -m bench.objectives --out=/tmp/objectives --quick                   # a smoke run, about 30 s
"""

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable

import click
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench import common
from bench.flow_matching import to_uint8
from bench.seeds import RunCache, bootstrap_ci, examples_to_threshold, fmt_ci, ratio_ci, run_cells
from dnnlib.cli import pick_device
from dnnlib.util import parse_int_list
from examples import ddpm_epsilon as ddpm
from examples import rectified_flow as rf
from examples.common import UNET_KWARGS, load_images, update_ema
from infonoise import DiscreteTimesteps, FlowMatching, InfoNoise, LogNormal, LogUniform, edm_grid, edm_weight
from infonoise.conversions import flow_sigma_from_t
from infonoise.oracles import empirical_bayes_mse, tabulated
from training.networks import EDMPrecond, SongUNet
from training.sampling import edm_sampler

OBJECTIVES = ('rf', 'ddpm', 'edm')
SCHEDULES = (
    'default',
    'uniform',
    'infonoise',
    'infonoise-paper',
    'oracle',
    'projection',
    'tempered',
    'excess',
    'bounded',
)
# InfoNoise's arguments per adaptive noise sampler, on top of the bench's durations and bins (`Context.kwargs`).
VARIANTS = {'infonoise': {}, 'infonoise-paper': dict(build='paper'), 'oracle': {}, 'excess': {},
            'projection': dict(projection='lognormal'), 'tempered': dict(temper=0.5), 'bounded': {}}  # fmt: skip
UNET = dict(UNET_KWARGS, model_channels=16)  # A quarter of the demo network's cost.
LR, RAMPUP_KIMG, EMA_RATIO = 2e-3, 2.0, 0.1  # Adam's rate, its linear ramp-up; EMA half-life = 10 % of images seen.
# Horizons, kEx: where the default noise sampler's FD has fallen near its floor (ε-prediction DDPM learns slowest).
KIMG = dict(rf=12.0, ddpm=20.0, edm=15.0)
MMSE_SAMPLES = 2000  # Monte-Carlo draws per σ of the training set's exact mmse.
# The fixed grids on which a cell records its learned law: rf t, ddpm timesteps, edm ln σ.
DENSITY_GRID = dict(rf=np.linspace(0.0025, 0.9975, 200), ddpm=np.arange(0, ddpm.T, 5),
                    edm=np.linspace(math.log(0.002), math.log(80), 200))  # fmt: skip
QUICK = dict(kimg=0.768, samples=64, nfe=4, seeds='0', schedules='default,infonoise')  # InfoNoise: 8 bins, N_min 1.


@dataclasses.dataclass
class Context:
    """What building a noise sampler needs besides its name: the run's length in steps, and for `oracle` and `excess`
    the training set's exact mmse (empirical Bayes) at the centres of the InfoNoise grid."""

    steps: int
    min_count: int = 8
    num_bins: int | None = None  # None: 32, and for ddpm as many as the adapter can fill with timesteps
    mmse: dict | None = None  # {'sigma': [K], 'mse': [K] (the set's own), 'held_out': [K] (left out, capped by σ²)}
    data_variance: float | None = None  # Per-element variance of the training images (`bounded`).

    def kwargs(self, objective: str) -> dict:
        """InfoNoise's durations in steps (warm-up a sixth of the run, a refresh every thirtieth) and bins."""
        return dict(warmup_steps=self.steps // 6, refresh_steps=max(1, self.steps // 30), min_count=self.min_count,
                    num_bins=self.num_bins or (None if objective == 'ddpm' else 32))  # fmt: skip


@dataclasses.dataclass
class Schedule:
    sample: Callable  # (n, device) -> what the objective draws: t, timesteps or σ
    observe: Callable | None = None  # (draw, per-sample mse in the objective's target), or None for a fixed law
    noise: InfoNoise | None = None  # The InfoNoise instance behind it, for its learned law
    adapter: object = None  # DiscreteTimesteps (ddpm), for the timestep probabilities


FIXED = {
    'rf': dict(default=lambda n, device: torch.sigmoid(torch.randn(n, device=device)),
               uniform=lambda n, device: torch.rand(n, device=device)),
    'ddpm': dict(default=lambda n, device: torch.randint(ddpm.T, (n,), device=device)),
    'edm': dict(default=LogNormal(-1.2, 1.2).sample, uniform=LogUniform(0.002, 80.0).sample),
}  # fmt: skip


def available(objective: str, name: str) -> bool:
    """False for a noise sampler that would duplicate another (ddpm's uniform timesteps are its default), and for
    `bounded` outside ddpm: only an ε-predictor's x₀ error (σ² times its own) can exceed the bound by much."""
    if name == 'bounded':
        return objective == 'ddpm'
    return name not in ('default', 'uniform') or name in FIXED[objective]


def make_schedule(objective: str, name: str, context: Context) -> Schedule:
    """The noise sampler `name` for `objective` (one that is `available`)."""
    if name in ('default', 'uniform'):
        return Schedule(FIXED[objective][name])
    kwargs = dict(context.kwargs(objective), **VARIANTS[name])
    if name == 'excess':
        kwargs['reference_mse'] = tabulated(context.mmse['sigma'], context.mmse['mse'])  # Linear in ln σ.
    if name == 'bounded':
        kwargs['data_variance'] = context.data_variance
    if objective == 'rf':
        fm = FlowMatching(**kwargs)
        schedule = Schedule(fm.sample_t, fm.observe, fm.sampler)
    elif objective == 'ddpm':
        steps = DiscreteTimesteps(ddpm.ALPHAS_CUMPROD, prediction='epsilon', **kwargs)
        schedule = Schedule(steps.sample, steps.observe, steps.sampler, steps)
    else:
        noise = InfoNoise(weight='edm', **kwargs)
        schedule = Schedule(noise.sample, noise.observe, noise)
    if name == 'oracle':
        schedule.noise.fix_profile(torch.tensor(context.mmse['held_out'], dtype=torch.float64))
        schedule.observe = None
    return schedule


def exact_mmse(objective: str, context: Context, images: torch.Tensor, path: str, num_samples: int) -> dict:
    """The training set's empirical-Bayes mmse at the centres of the objective's InfoNoise grid, its own ('mse') and
    held out ('held_out': each point left out of the posterior, capped by σ²), cached in `path`."""
    sigma = make_schedule(objective, 'infonoise', context).noise.grid.centers.tolist()
    cache = RunCache(path, dict(sigma=sigma, num_samples=num_samples))
    for key in ('mse', 'held_out'):
        if cache.get(key) is None:
            generator = torch.Generator().manual_seed(0)
            cache.put(key, [empirical_bayes_mse(s, images, num_samples, generator, key == 'held_out') for s in sigma])
    return dict(sigma=sigma, mse=cache.get('mse'), held_out=cache.get('held_out'))


def make_net(objective: str) -> torch.nn.Module:
    if objective == 'edm':
        return EDMPrecond(img_resolution=16, img_channels=1, model_type='SongUNet', **UNET)
    unet = SongUNet(img_resolution=16, in_channels=1, out_channels=1, **UNET)
    if objective == 'ddpm':
        return unet  # Conditioned on the timestep itself, as examples/ddpm_epsilon.py.
    net = rf.VelocityNet()
    net.unet = unet  # The same conditioning, on the smaller U-Net.
    return net


def losses(objective: str, net, x0: torch.Tensor, draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample unweighted MSE in the objective's own target [N] (what `observe` takes), and the training loss."""
    eps = torch.randn_like(x0)
    if objective == 'rf':  # x_t = (1 − t)x₀ + tε, velocity ε − x₀.
        t = draw[:, None, None, None]
        mse = (net((1 - t) * x0 + t * eps, draw) - (eps - x0)).square().flatten(1).mean(1)
        return mse, mse.mean()
    if objective == 'ddpm':  # x_t = √ᾱ x₀ + √(1 − ᾱ) ε, target ε.
        a = ddpm.ALPHAS_CUMPROD.to(x0.device)[draw].float()[:, None, None, None]
        mse = (net(a.sqrt() * x0 + (1 - a).sqrt() * eps, draw.float(), None) - eps).square().flatten(1).mean(1)
        return mse, mse.mean()
    mse = (net(x0 + draw[:, None, None, None] * eps, draw) - x0).square().flatten(1).mean(1)  # EDM: D(x; σ) vs x₀.
    return mse, (edm_weight(draw) * mse).mean()


@torch.no_grad()
def generate(objective: str, net, num: int, nfe: int, seed: int, device) -> torch.Tensor:
    """uint8 NCHW samples from the objective's solver at about `nfe` network evaluations."""
    latents = torch.randn([num, 1, 16, 16], generator=torch.Generator().manual_seed(seed)).to(device)
    if objective == 'rf':
        return to_uint8(rf.sample(net, num, nfe, seed=seed))
    if objective == 'ddpm':
        return to_uint8(ddpm.ddim(net, latents, nfe))
    return to_uint8(edm_sampler(net, latents, edm_grid(max(2, nfe // 2)).to(device)).float().clamp(-1, 1))


def learned_density(objective: str, schedule: Schedule) -> list[float]:
    """The noise sampler's current law on DENSITY_GRID: the density of t (rf) or ln σ (edm), T·P(timestep) (ddpm)."""
    x = DENSITY_GRID[objective]
    if objective == 'ddpm':
        return (schedule.adapter.probabilities()[x] * ddpm.T).tolist()
    edges = np.concatenate([[1.5 * x[0] - 0.5 * x[1]], (x[1:] + x[:-1]) / 2, [1.5 * x[-1] - 0.5 * x[-2]]])
    sigma = flow_sigma_from_t(torch.from_numpy(edges)) if objective == 'rf' else torch.from_numpy(np.exp(edges))
    return (np.diff(schedule.noise.cdf(sigma).numpy()) / np.diff(edges)).tolist()


_WORKER: dict = {}  # Per process: the training images and the FD-MNIST scorer, loaded once.


def run_cell(objective: str, name: str, seed: int, opts: dict, context: Context) -> dict:
    """Train one cell and evaluate it at every third of the horizon; its record."""
    start, device = time.time(), pick_device(opts['device'])
    if 'score' not in _WORKER:
        _WORKER.update(images=load_images(opts['data']).to(device),
                       score=common.fd_mnist_score(opts['data'], os.path.join(opts['out'], 'fd-ref.npz'), device))  # fmt: skip
    images, score = _WORKER['images'], _WORKER['score']
    torch.manual_seed(seed)
    schedule = make_schedule(objective, name, context)
    net = make_net(objective).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    batch, fd, eval_seconds = opts['batch'], {}, 0.0
    evals = {round(context.steps * (i + 1) / 3) for i in range(3)}
    for step in range(1, context.steps + 1):
        x0 = images[torch.randint(len(images), (batch,), device=device)]
        draw = schedule.sample(batch, device)
        mse, loss = losses(objective, net, x0, draw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g['lr'] = LR * min(1.0, step * batch / (RAMPUP_KIMG * 1000))
        opt.step()
        if schedule.observe is not None:
            schedule.observe(draw, mse.detach())
        update_ema(ema, net, batch, half_life_kimg=EMA_RATIO * step * batch / 1000)
        if step in evals:
            t0 = time.time()
            fd[f'{step * batch / 1000:g}'] = score(generate(objective, ema, opts['samples'], opts['nfe'], seed, device))
            eval_seconds += time.time() - t0
    record = dict(fd=fd, seconds=time.time() - start, eval_seconds=eval_seconds)
    if schedule.noise is not None:
        noise = schedule.noise
        record.update(refreshes=noise.refreshes, pivot=noise.pivot, density=learned_density(objective, schedule))
    return record


def kimg_to_reach(curves: list[dict], target: float) -> str:
    """Mean [CI] over seeds of the kEx at which each seed's curve reaches `target`; (n/N) when only some do."""
    reached = [examples_to_threshold([float(k) for k in fd], list(fd.values()), target) for fd in curves]
    kimg = [k for k in reached if k is not None]
    if not kimg:
        return '—'
    return fmt_ci(*bootstrap_ci(kimg)) + ('' if len(kimg) == len(curves) else f' ({len(kimg)}/{len(curves)} seeds)')


def report(runs: dict[str, list[dict]], objective: str) -> str:
    """One objective's table; `runs` maps each noise sampler to its cells' records."""
    finals = {name: [list(r['fd'].values())[-1] for r in cells] for name, cells in runs.items()}
    target = float(np.mean(finals['default'])) if finals.get('default') else None
    rows = []
    for name, cells in runs.items():
        ratio = fmt_ci(*ratio_ci(finals[name], finals['default']), digits=3) if target else '—'
        reach = kimg_to_reach([r['fd'] for r in cells], target) if target else '—'
        versus = fmt_ci(*ratio_ci(finals[name], finals['infonoise']), digits=3) if 'infonoise' in finals else '—'
        rows.append([name, fmt_ci(*bootstrap_ci(finals[name])), ratio, reach, len(cells), versus])
    headers = ['schedule', 'final FD [95 % CI]', 'ratio to default', "kEx to default's final FD", 'seeds',
               'ratio to infonoise']  # fmt: skip
    return f'### {objective}\n\n' + common.markdown_table(headers, rows)


def plot(all_runs: dict[str, dict[str, list[dict]]], path: str) -> None:
    """Per objective (a row): mean FD curves over seeds, and the learned laws against the default's."""
    fig = Figure(figsize=(10, 3.2 * len(all_runs)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(all_runs), 2, squeeze=False)
    defaults = dict(rf=lambda t: np.exp(-0.5 * np.log(t / (1 - t)) ** 2) / np.sqrt(2 * np.pi) / (t * (1 - t)),
                    ddpm=np.ones_like, edm=lambda s: np.exp(-0.5 * ((s + 1.2) / 1.2) ** 2) / (1.2 * np.sqrt(2 * np.pi)))  # fmt: skip
    xlabels = dict(rf='t', ddpm='timestep', edm='ln σ')
    for (objective, runs), (ax, bx) in zip(all_runs.items(), axes):
        for name, cells in runs.items():
            kimg = [float(k) for k in cells[0]['fd']]
            color = f'C{SCHEDULES.index(name)}'  # One colour per noise sampler in every panel.
            ax.plot(kimg, np.mean([list(r['fd'].values()) for r in cells], 0), 'o-', color=color, label=name)
            if name in ('infonoise', 'infonoise-paper'):
                bx.plot(DENSITY_GRID[objective], np.mean([r['density'] for r in cells], 0), color=color, label=name)
        x = DENSITY_GRID[objective]
        bx.plot(x, defaults[objective](x), '--', color='C0', label='default')
        ax.set(xlabel='kEx', ylabel='FD-MNIST (mean over seeds)', yscale='log', title=objective)
        bx.set(xlabel=xlabels[objective], ylabel='density' + (' × T' if objective == 'ddpm' else ''),
               title='learned law at the end (mean over seeds)')  # fmt: skip
        ax.legend(fontsize=7)
        bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_names(value: str, choices: tuple[str, ...], option: str) -> list[str]:
    names = [name.strip() for name in value.split(',') if name.strip()]
    if not names or any(name not in choices for name in names):
        raise click.ClickException(f'{option}: expected a comma-separated subset of {", ".join(choices)}')
    return names


# fmt: off
@click.command(context_settings={'show_default': True})
@click.option('--out',        help='Output directory', required=True)
@click.option('--data',       help='MNIST-5k 16x16 (made if missing)', default=common.DEFAULT_DATA)
@click.option('--objectives', help='Comma-separated objectives', default=','.join(OBJECTIVES))
@click.option('--schedules',  help='Comma-separated noise samplers', default=','.join(SCHEDULES))
@click.option('--seeds',      help='Training seeds: a list such as 0-4 or 0,2', default='0-4')
@click.option('--kimg',       help='Training examples per cell, thousands  [default: rf 12, ddpm 20, edm 15]', type=click.FloatRange(min=0, min_open=True))
@click.option('--batch',      help='Batch size', type=click.IntRange(min=1), default=32)
@click.option('--samples',    help='Samples per evaluation', type=click.IntRange(min=2), default=500)
@click.option('--nfe',        help='Network evaluations per sample (edm: Heun, nfe/2 steps)', type=click.IntRange(min=3), default=32)
@click.option('--jobs',       help='Cells trained in parallel processes', type=click.IntRange(min=1), default=1)
@click.option('--device',     help='Device  [default: cuda if available]', type=click.Choice(['cuda', 'cpu']))
@click.option('--quick',      help='Smoke run: tiny horizon, 1 seed, 2 noise samplers, 64 samples', is_flag=True)
# fmt: on
@click.pass_context
def main(ctx, **opts):
    """Rectified flow, DDPM and EDM on MNIST-5k 16x16 under fixed noise samplers and InfoNoise's variants."""
    start = time.time()
    common.apply_quick(ctx, opts, QUICK if opts['quick'] else {})
    objectives = parse_names(opts['objectives'], OBJECTIVES, '--objectives')
    names = parse_names(opts['schedules'], SCHEDULES, '--schedules')
    try:
        seeds = sorted(set(parse_int_list(opts['seeds'])))
    except ValueError as e:
        raise click.ClickException(f'--seeds: {e}') from None
    os.makedirs(opts['out'], exist_ok=True)
    common.ensure_dataset(opts['data'], common.DATASET_SOURCES['mnist'])
    device = pick_device(opts['device'])
    common.fd_mnist_score(opts['data'], os.path.join(opts['out'], 'fd-ref.npz'), device)  # Reference statistics, once.
    kimg = {o: opts['kimg'] or KIMG[o] for o in OBJECTIVES}
    steps = {o: max(3, round(kimg[o] * 1000 / opts['batch'])) for o in OBJECTIVES}  # Of all: the cache's settings.
    quick = dict(min_count=1, num_bins=8) if opts['quick'] else {}  # So that InfoNoise refreshes in a quick run.
    contexts = {o: Context(steps[o], **quick) for o in objectives}
    images = load_images(opts['data']) if {'oracle', 'excess', 'bounded'} & set(names) else None
    for objective in objectives if images is not None else []:  # The oracles' exact mmse, once per objective.
        path = os.path.join(opts['out'], f'mmse-{objective}.json')
        mmse = exact_mmse(objective, contexts[objective], images, path, 64 if opts['quick'] else MMSE_SAMPLES)
        contexts[objective].mmse = mmse
        contexts[objective].data_variance = float(images.var(0).mean())  # Mean per-pixel variance.
    config = {key: opts[key] for key in ('data', 'batch', 'samples', 'nfe', 'quick')}
    cache = RunCache(os.path.join(opts['out'], 'runs.json'), dict(config, steps=steps, unet=UNET, lr=LR))
    cells = [(o, n, s) for o in objectives for n in names for s in seeds if available(o, n)]
    todo = [cell for cell in cells if cache.get('/'.join(map(str, cell))) is None]
    cell_opts = {key: opts[key] for key in ('data', 'out', 'device', 'batch', 'samples', 'nfe')}

    def done(cell, record):
        cache.put('/'.join(map(str, cell)), record)
        fds = ', '.join(f'{v:.2f}' for v in record['fd'].values())
        click.echo(f'{"/".join(map(str, cell))}: FD-MNIST {fds} ({record["seconds"]:.0f} s)')

    jobs = [(*cell, cell_opts, contexts[cell[0]]) for cell in todo]
    run_cells(run_cell, jobs, opts['jobs'], lambda job, record: done(job[:3], record))
    all_runs = {o: {n: [cache.get(f'{o}/{n}/{s}') for s in seeds] for n in names if (o, n, seeds[0]) in cells}
                for o in objectives}  # fmt: skip
    tables = [report(runs, f'{o}, {kimg[o]:g} kEx') for o, runs in all_runs.items()]
    notes = (f'Batch {opts["batch"]}; FD-MNIST of {opts["samples"]} samples at {opts["nfe"]} NFE against all training '
             'digits; 95 % percentile-bootstrap intervals over seeds')
    text = '\n\n'.join(tables) + '\n\n' + notes + '\n'
    with open(os.path.join(opts['out'], 'objectives.md'), 'w', encoding='utf-8') as f:
        f.write(text)
    click.echo(text)
    plot(all_runs, os.path.join(opts['out'], 'objectives.png'))
    common.write_json(os.path.join(opts['out'], 'record.json'), common.run_record('bench.objectives', start, device))


if __name__ == '__main__':
    main()
