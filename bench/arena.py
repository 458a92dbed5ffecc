"""The arena: every training-noise schedule in the library on five domains, ≥ 5 seeds per cell, ranked with 95 %
confidence intervals (issue 24).

Domains (each trains one small network for the same horizon under every schedule that applies to it):

- `mnist`: MNIST-5k 16x16, EDM's objective (EDMPrecond, EDM's weight), scored by FD-MNIST against all training digits;
- `bmnist`: binarized MNIST-5k 16x16 with w ≡ 1 (samples thresholded at 0 as `generate.py --binarize`), FD-MNIST
  against the binarized training digits;
- `ars`: real yeast DNA (the ARS1 library, centre 128 nt, 20,000 training sequences), w ≡ 1, 1-D network;
- `ecoli`: natural DNA, 128-nt windows of the *E. coli* K-12 chromosome (both strands, the training part of a
  contiguous split), w ≡ 1, 1-D network;
- `rf`: rectified flow on MNIST-5k 16x16 (velocity loss, Euler on a uniform t grid), FD-MNIST.

DNA is scored by the k-mer Jensen–Shannon divergence (in millibits, the mean over k) of the samples' decoded bases
against the training sequences, with the k that docs/dna.md's sanity tables find usable (ranking held-out real DNA
below the per-position model and the Markov chains, in order): k = 3..6 on ARS, 3..8 on E. coli (where an order-5
chain matches held-out windows up to k = 6), on 2,000 samples, the size at which those rankings hold (at 500 an
order-5 chain and held-out E. coli windows tie). Each domain's table ends with the scores, at the same sample size, of
trivial references: random training items (images), the per-position model and an order-5 Markov chain fit on the
training sequences (DNA); a schedule that does not beat them has not learned the domain.

Schedules (`SCHEDULES`; σ is the VE noise level, for rf σ = t/(1 − t)): `edm` log-normal(−1.2, 1.2), `loguniform`
on [0.002, 80], `sd3` logit-normal(0, 1), `jit` logit-normal of JiT, `laplace` in log-SNR, `uniform-t`, `curriculum`
(sd3, then uniform t from half the horizon), `kingma-gao` (adaptive, with importance weights), `min-snr` (the
domain's default law with the Min-SNR-5 weight), `learned` (the default law with EDM2's learned uncertainty
weighting), and `infonoise`. Each domain's reference (`default`) is its usual choice: `edm` for mnist, `loguniform`
(VE's) for the w ≡ 1 domains, `sd3` for rf. InfoNoise and Kingma–Gao warm up for a sixth of the horizon and refresh
every thirtieth, on 32 bins, with the library's defaults otherwise; nothing is tuned on these runs.

Every cell (domain, schedule, seed) is cached in OUT/runs.json under its full settings, so a killed arena continues
where it stopped, runs in several sittings, and a changed horizon adds cells instead of discarding old ones.
`--jobs` trains cells in parallel processes. The report (OUT/arena.md, printed) gives per domain the final score
(mean over seeds, 95 % percentile-bootstrap interval), the ratio to the default's and to InfoNoise's, the kEx each
schedule needs to reach the default's final score, a ranking, and a verdict for InfoNoise against the best rival;
OUT/arena.png draws the score curves with bands and the σ (t) densities each schedule actually drew.

    OMP_NUM_THREADS=1 python -m bench.arena --out=bench-out/arena --jobs=2
    python -m bench.arena --out=/tmp/arena --quick                          # the smoke run of the test suite
"""

import copy
import dataclasses
import json
import math
import os
import time

import click
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench import common
from bench.flow_matching import to_uint8
from bench.objectives import UNET, parse_names
from bench.seeds import RunCache, bootstrap_ci, examples_to_threshold, fmt_ci, ratio_ci, run_cells
from dnnlib.cli import pick_device
from dnnlib.util import parse_int_list
from examples import rectified_flow as rf
from examples.common import update_ema
from infonoise import (
    Curriculum,
    FlowMatching,
    InfoNoise,
    KingmaGao,
    LaplaceLogSNR,
    LogitNormal,
    LogNormal,
    LogUniform,
    UniformT,
    edm_grid,
    flow_velocity_loss_weight,
)
from infonoise.weights import WEIGHTS
from metrics.sequence_baselines import MarkovChain, PositionModel
from metrics.sequence_metrics import kmer_js_range
from training import sequences
from training.dataset import open_dataset
from training.networks import EDMPrecond, SongUNet
from training.sampling import edm_sampler

DATA = dict(mnist=common.DEFAULT_DATA, bmnist=common.DEFAULT_BDATA, ars=common.DEFAULT_DNA,
            ecoli=os.path.join('datasets', 'ecoli-128-train.npz'))  # fmt: skip
SOURCES = dict(
    mnist=common.DATASET_SOURCES['mnist'],
    bmnist=common.DATASET_SOURCES['bmnist'],
    ars=common.DATASET_SOURCES['dna'],
    ecoli=('--source=ecoli', '--window=128', '--stride=256', '--split=train'),
)


@dataclasses.dataclass(frozen=True)
class Domain:
    data: str  # Key of DATA / SOURCES
    kind: str  # 'edm' (denoiser D(x; σ), σ-space loss) or 'rf' (velocity)
    weight: str  # The loss weight, a name in infonoise.WEIGHTS
    default: str  # The reference schedule
    kimg: float  # Horizon
    score: str  # 'fd' (FD-MNIST) or 'kmer' (k-mer JS, millibits)
    endpoint: str = 'continuous'  # InfoNoise's pivot rule: 'discrete' for binarized data and DNA, as train.py detects
    ks: tuple[int, ...] = (3, 4, 5, 6)  # k-mer lengths of the DNA score: those its sanity table finds usable
    samples: int = 500  # Samples per evaluation (DNA: 2,000, the size at which the sanity table's ranking holds)


DOMAINS = {
    'mnist': Domain('mnist', 'edm', 'edm', 'edm', 15.0, 'fd'),
    'bmnist': Domain('bmnist', 'edm', 'uniform', 'loguniform', 15.0, 'fd', 'discrete'),
    'ars': Domain('ars', 'edm', 'uniform', 'loguniform', 15.0, 'kmer', 'discrete', samples=2000),
    'ecoli': Domain('ecoli', 'edm', 'uniform', 'loguniform', 15.0, 'kmer', 'discrete', (3, 4, 5, 6, 7, 8), 2000),
    'rf': Domain('mnist', 'rf', 'flow', 'sd3', 12.0, 'fd'),
}
SCHEDULES = ('edm', 'loguniform', 'sd3', 'jit', 'laplace', 'uniform-t', 'curriculum', 'kingma-gao', 'min-snr',
             'learned', 'infonoise')  # fmt: skip
LAWS = dict(edm=lambda: LogNormal(-1.2, 1.2), loguniform=lambda: LogUniform(0.002, 80.0), sd3=LogitNormal.sd3,
            jit=LogitNormal.jit, laplace=LaplaceLogSNR, **{'uniform-t': UniformT})  # fmt: skip
LR, RAMPUP_KIMG, EMA_RATIO = 2e-3, 2.0, 0.1  # As bench.objectives: Adam, its ramp-up, EMA half-life 10 % of images.
BINS = 32
DNA_UNET = dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
# Where the drawn noise levels are histogrammed: ln σ for σ-space domains, t for rf.
LN_SIGMA_EDGES = np.linspace(math.log(0.002) - 1, math.log(80) + 1, 61)
T_EDGES = np.linspace(0, 1, 51)
QUICK = dict(
    kimg=0.384, samples=48, nfe=4, seeds='0', schedules='edm,loguniform,sd3,curriculum,kingma-gao,learned,infonoise'
)


def applies(domain: str, name: str) -> bool:
    """Whether schedule `name` runs on `domain`: rectified flow has no EDM preconditioning (no learned weight), no
    Min-SNR variant of its velocity loss, and no use for EDM's or VE's σ ranges."""
    return DOMAINS[domain].kind == 'edm' or name not in ('edm', 'loguniform', 'min-snr', 'learned')


@dataclasses.dataclass
class Schedule:
    sample: object  # (n, device) -> σ (edm) or t (rf)
    observe: object  # (draw, per-sample mse in the objective's target)
    importance: object  # draw -> per-sample factor of the loss, or None
    noise: object  # The NoiseSampler in σ
    weight: object  # σ -> x₀-space loss weight (edm kind)
    learned: bool = False


def make_schedule(domain: str, name: str, steps: int, batch: int) -> Schedule:
    """The noise sampler (and loss weight) `name` on `domain`, trained for `steps` steps of `batch`."""
    d = DOMAINS[domain]
    adaptive = dict(warmup_steps=steps // 6, refresh_steps=max(1, steps // 30), num_bins=BINS)
    law_name = d.default if name in ('min-snr', 'learned') else name
    weight = flow_velocity_loss_weight if d.kind == 'rf' else WEIGHTS['min-snr' if name == 'min-snr' else d.weight]
    weight_fn = weight if d.kind == 'rf' else (lambda s, w=weight: w(s, 0.5))
    if law_name == 'infonoise':
        if d.kind == 'rf':
            fm = FlowMatching(min_count=8, **adaptive)
            return Schedule(fm.sample_t, fm.observe, None, fm.sampler, None)
        noise = InfoNoise(weight=weight_fn, endpoint=d.endpoint, min_count=8, **adaptive)
    elif law_name == 'kingma-gao':
        base = LogNormal(0.0, 1.0) if d.kind == 'rf' else LAWS[d.default]()
        sigma_range = dict(sigma_min=1e-3 / (1 - 1e-3), sigma_max=(1 - 1e-3) / 1e-3) if d.kind == 'rf' else {}
        noise = KingmaGao(base=base, weight=weight_fn, **sigma_range, **adaptive)
    elif law_name == 'curriculum':
        noise = Curriculum(LogitNormal.sd3(), UniformT(), switch_kimg=steps * batch / 2000)
    else:
        noise = LAWS[law_name]()
    if d.kind == 'rf':
        fm = FlowMatching(noise)
        return Schedule(fm.sample_t, fm.observe, fm.importance_t, noise, None)
    return Schedule(noise.sample, noise.observe, noise.importance, noise, weight_fn, learned=name == 'learned')


def load_data(path: str) -> torch.Tensor:
    """All items of an image zip or a sequence .npz as float [N, C, H, W] in [-1, 1] (sequences: one-hot [N, 4, 1, L])."""
    dataset = open_dataset(path)
    return torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))])).to(torch.float32) / 127.5 - 1


def make_net(domain: str, shape: tuple[int, ...], learned: bool) -> torch.nn.Module:
    d, (channels, _, length) = DOMAINS[domain], shape
    if d.kind == 'rf':
        net = rf.VelocityNet()
        net.unet = SongUNet(img_resolution=16, in_channels=1, out_channels=1, **UNET)
        return net
    extra = dict(uncertainty_channels=128) if learned else {}
    if d.score == 'kmer':
        return EDMPrecond(img_resolution=length, img_channels=channels, model_type='SequenceUNet', **DNA_UNET, **extra)
    return EDMPrecond(img_resolution=length, img_channels=channels, model_type='SongUNet', **UNET, **extra)


def losses(domain: str, schedule: Schedule, net, x0: torch.Tensor, draw: torch.Tensor):
    """Per-sample unweighted mse in the objective's target (what `observe` takes) and the training loss."""
    eps = torch.randn_like(x0)
    if DOMAINS[domain].kind == 'rf':  # x_t = (1 − t)x₀ + tε, velocity ε − x₀.
        t = draw[:, None, None, None]
        mse = (net((1 - t) * x0 + t * eps, draw) - (eps - x0)).square().flatten(1).mean(1)
        per_sample = mse
    else:
        sigma = draw[:, None, None, None]
        if schedule.learned:
            denoised, u = net(x0 + sigma * eps, draw, return_logvar=True)
        else:
            denoised, u = net(x0 + sigma * eps, draw), None
        mse = (denoised - x0).square().flatten(1).mean(1)
        per_sample = schedule.weight(draw) * mse
        if u is not None:  # EDM2: w·mse/e^u + u.
            per_sample = per_sample / u.reshape(-1).exp() + u.reshape(-1)
    factor = schedule.importance(draw) if schedule.importance is not None else None
    if factor is not None:
        per_sample = per_sample * factor.to(per_sample.dtype)
    return mse, per_sample.mean()


@torch.no_grad()
def generate(domain: str, net, shape, num: int, nfe: int, seed: int, device) -> torch.Tensor:
    """Samples at about `nfe` network evaluations: float [N, C, H, W] in [-1, 1]."""
    if DOMAINS[domain].kind == 'rf':
        return rf.sample(net, num, nfe, seed=seed)
    latents = torch.randn([num, *shape], generator=torch.Generator().manual_seed(seed)).to(device)
    return edm_sampler(net, latents, edm_grid(max(2, nfe // 2)).to(device)).float().clamp(-1, 1)


class Scorer:
    """The domain's score of float samples: FD-MNIST (binarized domains threshold first) or k-mer JS in millibits."""

    def __init__(self, domain: str, data: str, out: str, device):
        self.domain = DOMAINS[domain]
        if self.domain.score == 'fd':
            self.fd = common.fd_mnist_score(data, os.path.join(out, f'fd-ref-{self.domain.data}.npz'), device)
        else:
            self.reference = sequences.load_npz(data)[0]

    def __call__(self, x: torch.Tensor) -> float:
        if self.domain.score == 'fd':
            if self.domain.data == 'bmnist':
                x = torch.where(x > 0, 1.0, -1.0)
            return float(self.fd(to_uint8(x)))
        tokens = x[:, :, 0, :].argmax(1).cpu().numpy().astype(np.uint8)  # The nearest one-hot sequence.
        return self.kmer(tokens)

    def kmer(self, tokens: np.ndarray) -> float:
        return 1000 * kmer_js_range(tokens, self.reference, self.domain.ks).mean

    def references(self, num: int, seed: int = 0) -> dict[str, float]:
        """Scores of trivial generators at `num` samples: random training items, or for DNA the per-position model
        and an order-5 Markov chain fit on the training sequences."""
        if self.domain.score == 'fd':
            return {f'{num} random training images': float(self.fd.real_floor(num, seed))}
        rng, length = np.random.default_rng(seed), self.reference.shape[1]
        return {'per-position model': self.kmer(PositionModel.fit(self.reference).sample(num, rng)),
                'Markov chain, order 5': self.kmer(MarkovChain.fit(self.reference, 5).sample(num, length, rng))}  # fmt: skip


_WORKER: dict = {}  # Per process and domain: the training data and the scorer, loaded once.


def run_cell(domain: str, name: str, seed: int, opts: dict) -> dict:
    """Train one cell, evaluate it at every third of the horizon; its record (scores, the drawn law, seconds)."""
    start, device, d = time.time(), pick_device(opts['device']), DOMAINS[domain]
    data = opts['data'][domain]
    if domain not in _WORKER:
        _WORKER[domain] = (load_data(data).to(device), Scorer(domain, data, opts['out'], device))
    x, score = _WORKER[domain]
    batch, kimg = opts['batch'], opts['kimg'] or d.kimg
    steps = max(3, round(kimg * 1000 / batch))
    torch.manual_seed(seed)
    schedule = make_schedule(domain, name, steps, batch)
    net = make_net(domain, tuple(x.shape[1:]), schedule.learned).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    edges = T_EDGES if d.kind == 'rf' else LN_SIGMA_EDGES
    inner = torch.as_tensor(edges[1:-1], dtype=torch.float64, device=device)  # np.histogram's bins, end bins clipped.
    drawn = torch.zeros(len(edges) - 1, dtype=torch.float64, device=device)  # Counted on the device: no sync a step.
    scores, evals = {}, {round(steps * (i + 1) / 3) for i in range(3)}
    for step in range(1, steps + 1):
        x0 = x[torch.randint(len(x), (batch,), device=device)]
        draw = schedule.sample(batch, device)
        mse, loss = losses(domain, schedule, net, x0, draw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g['lr'] = LR * min(1.0, step * batch / (RAMPUP_KIMG * 1000))
        opt.step()
        schedule.observe(draw, mse.detach())
        value = draw.double() if d.kind == 'rf' else draw.double().log()
        drawn += torch.bincount(torch.bucketize(value, inner, right=True), minlength=len(drawn))
        update_ema(ema, net, batch, half_life_kimg=EMA_RATIO * step * batch / 1000)
        if step in evals:
            samples = generate(domain, ema, tuple(x.shape[1:]), num_samples(domain, opts), opts['nfe'], seed, device)
            scores[f'{step * batch / 1000:g}'] = score(samples)
    drawn = drawn.cpu().numpy()
    density = drawn / drawn.sum() / np.diff(edges)
    return dict(score=scores, density=density.tolist(), seconds=time.time() - start)


def num_samples(domain: str, opts: dict) -> int:
    return opts['samples'] or DOMAINS[domain].samples


def cell_key(domain: str, name: str, seed: int, opts: dict) -> str:
    """A cell's cache key: every setting its result depends on."""
    settings = dict(domain=domain, schedule=name, seed=seed, kimg=opts['kimg'] or DOMAINS[domain].kimg,
                    samples=num_samples(domain, opts), batch=opts['batch'], nfe=opts['nfe'], data=opts['data'][domain])  # fmt: skip
    return json.dumps(settings, sort_keys=True)


def verdict(finals: dict[str, list[float]], default: str) -> str:
    """InfoNoise against the best rival (lowest mean final score): wins / ties / loses by its ratio's 95 % CI."""
    rivals = {n: v for n, v in finals.items() if n != 'infonoise'}
    if 'infonoise' not in finals or not rivals:
        return ''
    if len(finals['infonoise']) < 2:
        return 'One seed: no interval, no verdict.'
    best = min(rivals, key=lambda n: np.mean(rivals[n]))
    ratio, lo, hi = ratio_ci(finals['infonoise'], rivals[best])
    outcome = 'wins' if hi < 1 else 'loses' if lo > 1 else 'ties'
    reference = ratio_ci(finals['infonoise'], finals[default]) if default in finals else None
    against = f'; against the default {default}: {fmt_ci(*reference, digits=3)}' if reference else ''
    return f'InfoNoise {outcome} against the best rival {best}: ratio {fmt_ci(ratio, lo, hi, digits=3)}{against}.'


def report(domain: str, runs: dict[str, list[dict]], kimg: float, references: dict[str, float]) -> str:
    d = DOMAINS[domain]
    finals = {n: [list(r['score'].values())[-1] for r in cells] for n, cells in runs.items()}
    target = float(np.mean(finals[d.default])) if d.default in finals else None
    ranked = sorted(finals, key=lambda n: np.mean(finals[n]))
    rows = []
    for name in ranked:
        curves = [r['score'] for r in runs[name]]
        reached = (
            [examples_to_threshold([float(k) for k in c], list(c.values()), target) for c in curves] if target else []
        )
        kimgs = [k for k in reached if k is not None]
        reach = (fmt_ci(*bootstrap_ci(kimgs)) + ('' if len(kimgs) == len(curves) else f' ({len(kimgs)}/{len(curves)})')
                 if kimgs else '—')  # fmt: skip
        versus = {ref: fmt_ci(*ratio_ci(finals[name], finals[ref]), digits=3) if ref in finals else '—'
                  for ref in (d.default, 'infonoise')}  # fmt: skip
        rows.append([ranked.index(name) + 1, name, fmt_ci(*bootstrap_ci(finals[name])), versus[d.default], reach,
                     versus['infonoise'], len(curves)])  # fmt: skip
    unit = 'FD-MNIST' if d.score == 'fd' else 'k-mer JS (mbit)'
    headers = ['rank', 'schedule', f'final {unit} [95 % CI]', f'ratio to {d.default}', f"kEx to {d.default}'s final",
               'ratio to infonoise', 'seeds']  # fmt: skip
    trivial = '; '.join(f'{name} {value:.3g}' for name, value in references.items())
    return (f'### {domain}, {kimg:g} kEx\n\n' + common.markdown_table(headers, rows) + '\n\n'
            + verdict(finals, d.default) + f'\n\nReferences at the same sample size: {trivial}.')  # fmt: skip


def plot(all_runs: dict[str, dict[str, list[dict]]], path: str) -> None:
    """Per domain (a row): mean score against kEx with 95 % bands over seeds, and the densities actually drawn."""
    fig = Figure(figsize=(11, 3.3 * len(all_runs)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(all_runs), 2, squeeze=False)
    for (domain, runs), (ax, bx) in zip(all_runs.items(), axes):
        d = DOMAINS[domain]
        edges = T_EDGES if d.kind == 'rf' else LN_SIGMA_EDGES
        for name, cells in runs.items():
            color, style = ('black', '-') if name == 'infonoise' else (f'C{SCHEDULES.index(name)}', '-')
            kimg = [float(k) for k in cells[0]['score']]
            curves = np.array([list(r['score'].values()) for r in cells])
            bands = np.array([bootstrap_ci(c)[1:] for c in curves.T]) if len(cells) > 1 else None
            width = 2.5 if name == 'infonoise' else 1.2
            ax.plot(kimg, curves.mean(0), style, color=color, lw=width, label=name, marker='o', ms=3)
            if bands is not None:
                ax.fill_between(kimg, bands[:, 0], bands[:, 1], color=color, alpha=0.15)
            centres = (edges[1:] + edges[:-1]) / 2
            bx.plot(centres, np.mean([r['density'] for r in cells], 0), color=color, lw=width, label=name)
        unit = 'FD-MNIST' if d.score == 'fd' else 'k-mer JS (mbit)'
        ax.set(xlabel='kEx', ylabel=unit, yscale='log', title=f'{domain}: mean over seeds, 95 % band')
        bx.set(xlabel='t' if d.kind == 'rf' else 'ln σ', ylabel='density drawn', title=f'{domain}: what was drawn')
        ax.legend(fontsize=6, ncol=2)
        bx.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# fmt: off
@click.command(context_settings={'show_default': True})
@click.option('--out',       help='Output directory (runs.json, arena.md, arena.png)', required=True)
@click.option('--domains',   help='Comma-separated domains', default=','.join(DOMAINS))
@click.option('--schedules', help='Comma-separated schedules (each runs where it applies)', default=','.join(SCHEDULES))
@click.option('--seeds',     help='Training seeds, e.g. 0-4', default='0-4')
@click.option('--kimg',      help='Training examples per cell, thousands  [default: per domain, DOMAINS]', type=click.FloatRange(min=0, min_open=True))
@click.option('--batch',     help='Batch size', type=click.IntRange(min=1), default=32)
@click.option('--samples',   help='Samples per evaluation  [default: 500 images, 2,000 sequences]', type=click.IntRange(min=2))
@click.option('--nfe',       help='Network evaluations per sample (Heun: nfe/2 steps; rf: Euler steps)', type=click.IntRange(min=3), default=32)
@click.option('--data-dir',  help='Where the domains\' data sets are built (or found)', default='.')
@click.option('--jobs',      help='Cells trained in parallel processes', type=click.IntRange(min=1), default=1)
@click.option('--device',    help='Device  [default: cuda if available]', type=click.Choice(['cuda', 'cpu']))
@click.option('--quick',     help='Smoke run: tiny horizon, 1 seed, a few schedules, 48 samples', is_flag=True)
@click.option('--report-only', help='Report the cached cells; train nothing', is_flag=True)
# fmt: on
@click.pass_context
def main(ctx, **opts):
    """Rank every training-noise schedule on five domains, with seeds and confidence intervals."""
    start = time.time()
    common.apply_quick(ctx, opts, QUICK if opts['quick'] else {})
    domains = parse_names(opts['domains'], tuple(DOMAINS), '--domains')
    names = parse_names(opts['schedules'], SCHEDULES, '--schedules')
    try:
        seeds = sorted(set(parse_int_list(opts['seeds'])))
    except ValueError as e:
        raise click.ClickException(f'--seeds: {e}') from None
    os.makedirs(opts['out'], exist_ok=True)
    opts['data'] = {k: os.path.join(opts['data_dir'], DATA[DOMAINS[k].data]) for k in domains}
    for domain in domains:
        common.ensure_dataset(opts['data'][domain], SOURCES[DOMAINS[domain].data])
    cache = RunCache(os.path.join(opts['out'], 'runs.json'), dict(arena=1))
    cells = [(d, n, s) for d in domains for n in names if applies(d, n) for s in seeds]
    todo = [c for c in cells if cache.get(cell_key(*c, opts)) is None]
    click.echo(f'{len(cells)} cells, {len(cells) - len(todo)} cached, {len(todo)} to train')
    if opts['report_only']:
        todo = []
    cell_opts = {k: opts[k] for k in ('data', 'out', 'device', 'batch', 'samples', 'nfe', 'kimg')}

    def done(job, record):
        cache.put(cell_key(*job), record)
        scores = ', '.join(f'{v:.3g}' for v in record['score'].values())
        click.echo(f'{"/".join(map(str, job[:3]))}: {scores} ({record["seconds"]:.0f} s)')

    run_cells(run_cell, [(*c, cell_opts) for c in todo], opts['jobs'], done)
    all_runs = {}
    for d in domains:
        runs = {n: [cache.get(cell_key(d, n, s, opts)) for s in seeds] for n in names if applies(d, n)}
        runs = {n: cells for n, cells in runs.items() if all(cells)}
        if runs:
            all_runs[d] = runs
    device = pick_device(opts['device'])
    references = {d: Scorer(d, opts['data'][d], opts['out'], device).references(num_samples(d, opts)) for d in all_runs}
    tables = [report(d, runs, opts['kimg'] or DOMAINS[d].kimg, references[d]) for d, runs in all_runs.items()]
    samples = opts['samples'] or '500 (images) or 2,000 (DNA)'
    notes = (f'Batch {opts["batch"]}; {samples} samples per evaluation at {opts["nfe"]} NFE; seeds '
             f'{opts["seeds"]}; 95 % percentile-bootstrap intervals over seeds; ratios < 1 are better.')
    text = '\n\n'.join(tables) + '\n\n' + notes + '\n'
    with open(os.path.join(opts['out'], 'arena.md'), 'w', encoding='utf-8') as f:
        f.write(text)
    click.echo(text)
    if all_runs:
        plot(all_runs, os.path.join(opts['out'], 'arena.png'))
    common.write_json(os.path.join(opts['out'], 'record.json'), common.run_record('bench.arena', start, device))


if __name__ == '__main__':
    main()
