"""Offline information profiles: of a frozen network, and the exact one of a finite data set (InfoNoise paper,
Sec. 6 "Offline diagnostics", Figures 4-5; App. A.2 and D.1).

A profile is measured, not learned: at K log-spaced noise levels σ_k (the centres of InfoNoise's log-grid over
[sigma_min, sigma_max]) the mean per-pixel squared error mse(σ) of D(x0 + σn; σ) is averaged over S clean images
drawn from the data set and Gaussian noise n. Then, by the rules online InfoNoise applies at a refresh (Sec. 5):
the rate r = mse/σ³ (Eq. 11), the pivot c (onset of information for continuous data, Eq. 18; power-law boundary
for discrete data, App. B.4), the gated rate (Eq. 17), the target density ρ (Eq. 13) with its CDF u (Eq. 14),
and the sampling density π ∝ φ/w (Eq. 16) for a loss weight w. The result is a `Profile`, written as the JSON
training writes (`Profile.to_dict()`, whose 'stderr' is the Monte-Carlo standard error of mse and 'count' the
samples per σ) plus 'u_info' (the InfoGrid coordinate of Eq. 19 at σ_k), 'peaks' and 'source', so that `generate.py --grid=infogrid --profile=FILE` and `plots.save_profile_plot` take it.

With the exact empirical-Bayes denoiser (`infonoise.empirical_bayes`) in place of a network, mse(σ) is the
data set's own Bayes mmse(σ) and the profile is exact up to Monte-Carlo error. A finite set of points has discrete
endpoints (bounded H[x0|xσ], App. B.1), so that profile takes the power-law pivot unless told otherwise.

    python diagnose.py profile --network=NET --data=DATA.zip --out=PROFILE.json --plot=PROFILE.png
    python diagnose.py bayes --data=DATA.zip --out=EXACT.json
    python diagnose.py figure --data=DATA.zip --out=DENOISED.png
"""

import functools
import inspect
import json
import math
import os
import time

import click
import numpy as np
import PIL.Image
import torch
import tqdm
from matplotlib import font_manager

from dnnlib import cli
from dnnlib.util import atomic_write
from infonoise import pivot as pivots
from infonoise.empirical_bayes import EmpiricalBayesDenoiser, denoising_rows
from infonoise.grids import information_coordinate
from infonoise.info_noise import InfoNoise
from infonoise.plots import plural, save_denoising_figure, save_profile_plot
from infonoise.profile import LogGrid, Profile
from infonoise.weights import WEIGHTS
from training.checkpoint import load_network
from training.dataset import Dataset
from training.dataset import open_dataset as open_any_dataset
from training.sampling import images_to_uint8, save_image, side_by_side, tile_images

# `figure`: the narrowest cell in pixels (images are enlarged by a whole factor to reach it) and the gap between.
FIGURE_CELL, FIGURE_PAD = 64, 2

# InfoNoise's settings (gate, smoothing, pivot rule) default to training's, so that the same rate gives the same
# pivot, ρ and π.
ONLINE = {name: p.default for name, p in inspect.signature(InfoNoise).parameters.items()}


def read_images(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images [S, C, H, W] at `indices` (each file decoded once) and their labels [S, L] (None if unused)."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    items = [dataset[i] for i in unique.tolist()]
    images = torch.from_numpy(np.stack([image for image, _ in items]))[inverse]
    labels = torch.from_numpy(np.stack([label for _, label in items]))[inverse] if dataset.has_labels else None
    return images, labels


def draw_indices(num_images: int, num_samples: int, seed: int) -> torch.Tensor:
    """S data indices: shuffled passes over the data set, so each image is used ⌊S/N⌋ or ⌈S/N⌉ times."""
    generator = torch.Generator().manual_seed(seed)
    passes = -(-num_samples // num_images)
    return torch.cat([torch.randperm(num_images, generator=generator) for _ in range(passes)])[:num_samples]


@torch.no_grad()
def denoising_mse(
    net: torch.nn.Module,
    clean: torch.Tensor,
    sigma: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str = 'cpu',
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo mean over `clean` [S, C, H, W] (EDM's [-1, 1]) of the per-pixel mean of (D(x0 + σn; σ) - x0)²
    at each σ [K], and its standard error; both float64 [K].

    Every σ sees the same images and the same noise (the generator is reseeded per σ): with these common random
    numbers the profile carries no independent jitter from one σ to the next.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    num = clean.shape[0]
    clean = clean.to(torch.float64)
    mean, stderr = torch.zeros(len(sigma), dtype=torch.float64), torch.zeros(len(sigma), dtype=torch.float64)
    with tqdm.tqdm(total=len(sigma) * num, unit='img', disable=not progress, leave=False) as bar:
        for k, s in enumerate(sigma.tolist()):
            generator = torch.Generator().manual_seed(seed)
            errors = []
            for start in range(0, num, batch_size):
                x0 = clean[start : start + batch_size]
                n = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
                x0, n = x0.to(device), n.to(device)
                s_batch = torch.full([x0.shape[0], 1, 1, 1], s, dtype=torch.float64, device=device)
                y = None if labels is None else labels[start : start + batch_size].to(device)
                denoised = net(x0 + s * n, s_batch, y).to(torch.float64)
                errors.append((denoised - x0).square().flatten(1).mean(1))
                bar.update(x0.shape[0])
            errors = torch.cat(errors).cpu()
            mean[k] = errors.mean()
            stderr[k] = errors.std() / num**0.5 if num > 1 else float('nan')
    return mean, stderr


def build_profile(
    grid: LogGrid,
    mse: torch.Tensor,
    weight: str = ONLINE['weight'],
    sigma_data: float = ONLINE['sigma_data'],
    endpoint: str = ONLINE['endpoint'],
    pivot: float | None = None,
    smoothing: float = ONLINE['smoothing'],
    floor: float = ONLINE['floor'],
    stderr: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    build: str = ONLINE['build'],
) -> Profile:
    """The `Profile` that an InfoNoise refresh (Alg. 1 lines 12-16) builds from per-bin losses `mse` on `grid`,
    with their standard errors `stderr` and sample counts `count` (both optional) recorded and weighting the
    power-law fit of the discrete pivot rule."""
    if weight not in WEIGHTS:
        raise ValueError(f'Unknown loss weight "{weight}"; choose from {", ".join(WEIGHTS)}')
    if endpoint not in ('continuous', 'discrete'):
        raise ValueError(f'endpoint must be "continuous" or "discrete", got "{endpoint}"')
    if not 0 <= floor <= 1:
        raise ValueError(f'floor must lie in [0, 1], got {floor}')
    sigma = grid.centers
    mse = torch.as_tensor(mse, dtype=torch.float64)
    if mse.shape != sigma.shape or not bool(torch.isfinite(mse).all()) or not bool((mse > 0).any()):
        raise ValueError(f'Need {len(sigma)} finite errors, some positive, got shape {tuple(mse.shape)}')
    # The refresh itself: an InfoNoise on this grid with these settings, fixed to these losses.
    noise = InfoNoise(
        weight=weight, sigma_data=sigma_data, sigma_min=float(grid.edges[0]), sigma_max=float(grid.edges[-1]),
        num_bins=grid.num_bins, endpoint=endpoint, pivot=pivot, smoothing=smoothing, floor=floor, build=build,
    )  # fmt: skip
    noise.fix_profile(mse, stderr=stderr, count=count)
    return noise.profile()


def info_coordinate(profile: Profile, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """u(σ_k) of Eq. 19, normalised over [sigma_min, sigma_max] exactly as InfoGrid normalises it."""
    u = information_coordinate(profile.sigma, profile.rate)
    lo, hi = u(np.log([sigma_min, sigma_max]))
    return torch.from_numpy((u(np.log(profile.sigma.numpy())) - lo) / (hi - lo))


def peaks(profile: Profile) -> dict[str, float]:
    """σ at the maximum of the rate and of the gated density ρ, over σ and per unit ln σ (σ times the density)."""
    s = profile.sigma
    return {
        'rate': float(s[profile.rate.argmax()]),
        'rho': float(s[profile.rho.argmax()]),
        'rate_per_ln_sigma': float(s[(s * profile.rate).argmax()]),
        'rho_per_ln_sigma': float(s[(s * profile.rho).argmax()]),
    }


def profile_record(profile: Profile, grid: LogGrid, **extra) -> dict:
    """The JSON record: `Profile.to_dict()` plus 'u_info', 'peaks', the grid range and `extra`."""
    record = profile.to_dict()
    sigma_min, sigma_max = float(grid.edges[0]), float(grid.edges[-1])
    record.update(u_info=info_coordinate(profile, sigma_min, sigma_max).tolist())
    record.update(peaks=peaks(profile), sigma_min=sigma_min, sigma_max=sigma_max, **extra)
    return record


# ----------------------------------------------------------------------------------------------------------------
# Command line.


def open_dataset(path: str, use_labels: bool = False, max_size: int | None = None) -> Dataset:
    if not os.path.exists(path):
        raise click.ClickException(f'--data: no such file or directory "{path}"')
    return open_any_dataset(path, use_labels=use_labels, max_size=max_size)


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to EDM's [-1, 1] (x/127.5 - 1), float64."""
    return pixels.to(torch.float64) / 127.5 - 1


def check_output(path: str | None, option: str) -> None:
    """Create the folder of an output before the computation, and fail then, not after it, if it cannot be."""
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        cli.check_output_dir(folder, option)
        os.makedirs(folder, exist_ok=True)


def run_profile(net, dataset: Dataset, source: str, title: str, sigma_data: float, opts: dict) -> None:
    """Measure, build, write and summarise the profile of `net` on `dataset` (shared by `profile` and `bayes`);
    `title` heads the plot."""
    if not 0 < opts['sigma_min'] < opts['sigma_max']:
        raise click.ClickException(
            f'Need 0 < --sigma-min < --sigma-max, got {opts["sigma_min"]} and {opts["sigma_max"]}'
        )
    check_output(opts['out'], '--out')
    check_output(opts['plot'], '--plot')
    shape = list(getattr(net, 'img_shape', [net.img_channels, net.img_resolution, net.img_resolution]))
    if dataset.image_shape != shape:
        raise click.ClickException(f'--data has images of shape {dataset.image_shape}, the denoiser expects {shape}')
    grid = LogGrid.make(opts['points'], opts['sigma_min'], opts['sigma_max'])
    pixels, labels = read_images(dataset, draw_indices(len(dataset), opts['samples'], opts['seed']))
    endpoint = opts['endpoint']
    if endpoint == 'auto':
        endpoint = 'discrete' if pivots.is_discrete(pixels.numpy()) else 'continuous'

    start = time.time()
    mse, stderr = denoising_mse(
        net, to_float(pixels), grid.centers, labels, opts['batch'], opts['seed'], opts['device'], progress=True
    )
    seconds = time.time() - start
    count = torch.full_like(mse, float(opts['samples']))
    profile = build_profile(
        grid, mse, opts['weight'], sigma_data, endpoint, None, opts['smoothing'], opts['floor'], stderr, count
    )
    record = profile_record(
        profile, grid, source=source, data=opts['data'], endpoint=endpoint, weight_name=opts['weight'],
        sigma_data=sigma_data, num_samples=opts['samples'], seed=opts['seed'], seconds=seconds,
    )  # fmt: skip
    with atomic_write(opts['out'], 'w', encoding='utf-8') as f:
        json.dump(record, f, allow_nan=False)
    if opts['plot'] is not None:
        save_profile_plot(profile, opts['plot'], title=title)

    p = record['peaks']
    click.echo(f'Wrote {opts["out"]}: {opts["points"]} σ-points x {opts["samples"]} samples in {seconds:.1f} s')
    click.echo(
        f'Rate r = mse/σ³ peaks at σ = {p["rate"]:.4g} (σ·r, per unit ln σ, at σ = {p["rate_per_ln_sigma"]:.4g})'
    )
    click.echo(
        f'Gated density ρ peaks at σ = {p["rho"]:.4g} (σ·ρ at σ = {p["rho_per_ln_sigma"]:.4g}); '
        f'pivot c = {profile.pivot:.4g} ({endpoint} endpoints, {profile.pivot_rule})'
    )


def profile_options(command):
    """Options shared by `profile` and `bayes`."""
    options = [
        click.option('--data', help='Data set (zip or folder, dataset_tool.py format)', metavar='ZIP|DIR', required=True),
        click.option('--out', help='Profile JSON to write', metavar='FILE', required=True),
        click.option('--plot', help='Also draw the profile (PNG)', metavar='FILE'),
        click.option('--points', help='Number K of log-spaced σ', type=click.IntRange(min=2), default=128),
        click.option('--samples', help='Noisy images S per σ', type=click.IntRange(min=2), default=1024),
        click.option('--sigma-min', help='Lower end of the σ-grid', type=cli.FloatRange(min=0, min_open=True), default=ONLINE['sigma_min']),
        click.option('--sigma-max', help='Upper end of the σ-grid', type=cli.FloatRange(min=0, min_open=True), default=ONLINE['sigma_max']),
        click.option('--batch', help='Images per evaluation', type=click.IntRange(min=1), default=256),
        click.option('--seed', help='Random seed of images and noise', type=click.IntRange(min=0), default=0),
        click.option('--device', help='Device  [default: cuda if available, else cpu]', type=click.Choice(['cuda', 'cpu'])),
        click.option('--endpoint', help='Pivot rule: onset (continuous) or power law (discrete); auto: from the pixels, discrete for bayes', type=click.Choice(['auto', 'continuous', 'discrete']), default='auto'),
        click.option('--weight', help='Loss weight w that π divides out', type=click.Choice(list(WEIGHTS)), default=ONLINE['weight']),
        click.option('--sigma-data', help='σ_data of the EDM weight  [default: the network\'s, else 0.5]', type=cli.FloatRange(min=0, min_open=True)),
        click.option('--smoothing', help='Smoothing width of the gated rate (grid points)', type=cli.FloatRange(min=0), default=ONLINE['smoothing']),
        click.option('--floor', help='Weight of the log-uniform floor in the emphasis', type=cli.FloatRange(0, 1), default=ONLINE['floor']),
    ]  # fmt: skip
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def click_errors(function):
    """Turn the library's ValueError/RuntimeError/OSError into click's one-line errors."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapper


@click.group()
def main():
    """Offline information profiles (InfoNoise paper, Sec. 6 and App. A.2), and side-by-side figures of σ-grids."""


@main.command(context_settings={'show_default': True})
@click.option('--network', help='Network snapshot, training state or EDM pickle', metavar='PATH|URL', required=True)
@profile_options
@click_errors
def profile(network, **opts):
    """Profile of a frozen network on a data set (labels from the data set for conditional networks)."""
    opts['device'] = cli.pick_device(opts['device'])
    if not os.path.exists(network) and '://' not in network:
        raise click.ClickException(f'--network: no such file "{network}"')
    net = load_network(network, device=opts['device']).net
    dataset = open_dataset(opts['data'], use_labels=net.label_dim > 0)
    if net.label_dim > 0 and dataset.label_dim != net.label_dim:
        raise click.ClickException(f'--data has {dataset.label_dim} classes, the network {net.label_dim}')
    sigma_data = opts['sigma_data'] or float(getattr(net, 'sigma_data', 0.5))
    run_profile(net, dataset, f'network:{network}', f'Offline profile ({network})', sigma_data, opts)


@main.command(context_settings={'show_default': True})
@profile_options
@click.option('--max-size', help='Use a random subset of this many images as the data set', type=click.IntRange(min=1))
@click_errors
def bayes(max_size, **opts):
    """Exact profile of a data set: its empirical-Bayes denoiser (App. A.2, D.1) in place of a network."""
    opts['device'] = cli.pick_device(opts['device'])
    # The empirical prior is a finite set of points: H[x0|xσ] <= log N is bounded and mmse vanishes faster than any
    # power of σ, the discrete-endpoint case of App. B.1, whatever the pixel values. The onset rule would put the
    # pivot above the rate's peak and gate the informative window away.
    if opts['endpoint'] == 'auto':
        opts['endpoint'] = 'discrete'
    dataset = open_dataset(opts['data'], max_size=max_size)
    pixels, _ = read_images(dataset, torch.arange(len(dataset)))
    net = EmpiricalBayesDenoiser(to_float(pixels)).to(opts['device'])
    source, title = (
        f'empirical-bayes:{len(dataset)} images',
        f'Exact profile (empirical Bayes, {plural(len(dataset), "image")})',
    )
    run_profile(net, dataset, source, title, opts['sigma_data'] or 0.5, opts)


def parse_sigmas(ctx, param, value: str) -> list[float]:
    try:
        sigmas = [float(v) for v in value.split(',') if v.strip()]
    except ValueError:
        raise click.BadParameter(f'expected comma-separated numbers, got "{value}"') from None
    if not sigmas or not all(0 < s < float('inf') for s in sigmas):
        raise click.BadParameter('need at least one noise level, all positive and finite')
    return sigmas


@main.command(context_settings={'show_default': True})
@click.option('--data', help='Data set (zip or folder, dataset_tool.py format)', metavar='ZIP|DIR', required=True)
@click.option('--out', help='PNG to write', metavar='FILE', required=True)
@click.option('--images', help='Number of data set images shown', type=click.IntRange(min=1), default=4)
@click.option(
    '--sigmas',
    help='Noise levels, one column each',
    metavar='LIST',
    callback=parse_sigmas,
    default='0.05,0.2,0.5,1,2,3,5,10,20',
)
@click.option('--max-size', help='Use a random subset of this many images as the data set', type=click.IntRange(min=1))
@click.option('--seed', help='Random seed of the images and noise', type=click.IntRange(min=0), default=0)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', type=click.Choice(['cuda', 'cpu']))
@click_errors
def figure(data, out, images, sigmas, max_size, seed, device):
    """Noisy inputs (upper row) and their Bayes-optimal denoised images (lower row), per image (Figures 1 and 12)."""
    device = cli.pick_device(device)
    check_output(out, '--out')
    dataset = open_dataset(data, max_size=max_size)
    pixels = to_float(read_images(dataset, torch.arange(len(dataset)))[0])
    shown = pixels[draw_indices(len(dataset), min(images, len(dataset)), seed)]
    rows = denoising_rows(EmpiricalBayesDenoiser(pixels).to(device), shown, sigmas, seed, device)
    # Cells at least FIGURE_CELL pixels wide leave room for each column's σ label; white gaps separate them.
    scale = math.ceil(FIGURE_CELL / pixels.shape[-1])
    grid = tile_images(images_to_uint8(rows), grid_w=len(sigmas), scale=scale, pad=FIGURE_PAD)
    title = f'Bayes-optimal denoising under the empirical prior of {plural(len(dataset), "image")}'
    save_denoising_figure(grid, sigmas, ['noisy', 'denoised'] * len(shown), FIGURE_PAD, out, title)
    click.echo(f'Wrote {out}: {plural(len(shown), "image")} x {plural(len(sigmas), "noise level")}')


@main.command('compare')
@click.option(
    '--image',
    'images',
    help='A PNG, e.g. a sample grid (repeat: one per --title)',
    metavar='PNG',
    multiple=True,
    required=True,
)
@click.option(
    '--title', 'titles', help='The title above each --image, in order', metavar='TEXT', multiple=True, required=True
)
@click.option('--out', help='Output PNG', metavar='PNG', required=True)
@click_errors
def compare(images, titles, out):
    """Put PNGs (e.g. the same seeds drawn on two σ-grids) side by side, each under its title, pixels unchanged."""
    check_output(out, '--out')
    arrays = []
    for path in images:
        image = PIL.Image.open(path)
        array = np.asarray(image.convert('L' if image.mode in ('1', 'L') else 'RGB'))
        arrays.append(array[:, :, None] if array.ndim == 2 else array)
    row = side_by_side(arrays, list(titles), font_path=font_manager.findfont('DejaVu Sans'))  # Has Greek letters.
    with atomic_write(out, 'wb') as f:
        save_image(row, f)
    print(f'Saved "{out}"')


if __name__ == '__main__':
    main()
