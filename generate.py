"""Generate images with a trained network, as EDM's generate.py (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models"), on a choice of sigma-grids.

One PNG per seed, drawn by EDM's Heun solver (Algorithm 2) on the σ-grid chosen by `--grid`: EDM's rho-grid (the
default), InfoGrid (InfoNoise paper, Eq. 19) from a learned or offline information profile, its closed form for a
Gaussian source (the tangent law), log-uniform, a grid read from a file, or EDM's VP/VE/iDDPM discretizations.
`--schedule`/`--scaling` (EDM's noise level function σ(t) and signal scaling s(t)) select EDM's ablation solver. Every
seed has its own random generator, so an image depends only on its seed, not on the batch size or the number of ranks;
under torchrun the seeds are split across ranks as EDM does. The grid used is written to OUTDIR/grid.json, which
`--grid=OUTDIR/grid.json` reads. `--binarize` thresholds every sample at 0 in [-1, 1] (pixels 0/255), for models of
binarised data (the InfoNoise paper's discrete-endpoint experiments), and is recorded in grid.json. A sequence network
(DNA, --arch=ddpmpp1d) writes OUTDIR/sequences.fasta instead of PNGs, each sample decoded to its nearest one-hot
sequence (argmax over the four bases), and `--npz` then holds the sequences in the sequence dataset format of
training/sequences.py. `--guidance=W` runs the guided denoiser of Karras et al. 2024 ("Guiding a Diffusion Model
with a Bad Version of Itself"): autoguidance with `--guide-network` (a weaker network of the same data), else
classifier-free guidance with the network's own null-label output; W = 1 is the unguided sampler, bit for bit.
"""

import json
import math
import os

import click
import numpy as np
import torch

import dnnlib
from dnnlib import cli
from dnnlib.util import atomic_write, parse_int_list
from infonoise import grid_files, grids
from infonoise.profile import Profile
from torch_utils import distributed as dist
from torch_utils import misc
from training import sequences
from training.checkpoint import load_network
from training.networks_1d import SequenceUNet
from training.sampling import (
    ablation_sampler,
    edm_sampler,
    generate_images,
    read_images,
    save_image,
    tile_images,
    write_images,
)


def write_image_collections(outdir, seeds, subdirs, labels, grid_png, npz, scale: int, pad: int) -> None:
    """--grid-png (all images tiled) and --npz (uint8 NHWC "arr_0", "seeds" and "labels" if conditional)."""
    images = read_images(outdir, seeds, subdirs)
    if grid_png is not None:
        os.makedirs(os.path.dirname(os.path.abspath(grid_png)), exist_ok=True)
        with atomic_write(grid_png, 'wb') as f:
            save_image(tile_images(images, scale=scale, pad=pad), f)
        dist.print0(f'Saved image grid to "{grid_png}"')
    if npz is not None:
        arrays = dict(arr_0=images, seeds=np.asarray(seeds, dtype=np.int64))
        if labels:
            arrays['labels'] = np.asarray([labels[seed] for seed in seeds], dtype=np.int64)
        os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
        with atomic_write(npz, 'wb') as f:
            np.savez(f, **arrays)
        dist.print0(f'Saved {len(seeds)} images to "{npz}"')


def write_sequences(outdir: str, npz: str | None, seeds: list[int], tokens: dict, labels: dict | None) -> None:
    """OUTDIR/sequences.fasta (one record per seed, in seed order) and optionally the .npz of the sequences."""
    rows = np.stack([tokens[seed] for seed in seeds])
    label_list = None if labels is None else [labels[seed] for seed in seeds]
    headers = [f'seed{seed:06d}' + ('' if labels is None else f' label={labels[seed]}') for seed in seeds]
    sequences.write_fasta(os.path.join(outdir, 'sequences.fasta'), rows, headers)
    dist.print0(f'Saved {len(seeds)} sequences to "{os.path.join(outdir, "sequences.fasta")}"')
    if npz is not None:
        sequences.save_npz(npz, rows, labels=label_list, seeds=seeds)
        dist.print0(f'Saved {len(seeds)} sequences to "{npz}"')


# ----------------------------------------------------------------------------------------------------------------------
# Grid inputs: the information profile (infogrid) and the Gaussian variances (tangent).


def read_profile(path: str | None, loaded) -> tuple[Profile, str]:
    """--profile, else the network file's own InfoNoise profile; and where it came from."""
    if path is not None:
        if not os.path.isfile(path):
            raise click.ClickException(f'--profile: no such file "{path}"')
        try:
            return Profile.load(path), path
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--profile: {e}') from None
    if loaded.profile is not None:
        return Profile.from_dict(loaded.profile, partial=True), 'network'
    noise, why = loaded.noise_kwargs or {}, 'the network has none (it was not trained with InfoNoise)'
    if str(noise.get('class_name', '')).endswith('InfoNoise'):
        why = (
            f'InfoNoise trained this network but had not refreshed yet at {loaded.kimg:g} kimg (warm-up '
            f'{noise.get("warmup_kimg")} kimg, a refresh check every {noise.get("refresh_kimg")} kimg; the log says '
            'why checks were skipped); use a later snapshot or'
        )
    raise click.ClickException(f'--grid=infogrid needs an information profile: {why}; pass --profile=FILE')


def read_variances(spec: str | None, sigma_data: float | None) -> list[float]:
    """--variances (`infonoise.grid_files.read_variances`: a scale or a JSON file), by default the network's sigma_data."""
    if spec is None and sigma_data is None:
        raise click.ClickException(
            '--grid=tangent needs --variances (a scale or a file): the network has no sigma_data'
        )
    if spec is None:
        return [float(sigma_data) ** 2]
    try:
        return grid_files.read_variances(spec)
    except (OSError, ValueError) as e:
        raise click.ClickException(f'--variances: {e}') from None


def resolve_grid(opts: dnnlib.EasyDict, steps_given: bool, loaded) -> tuple[torch.Tensor, dict]:
    """The grid of `--grid` (a name or a file) on the network's noise range, and how it was made."""
    net, grid, num_steps = loaded.net, opts.grid, opts.num_steps
    if grid not in grids.GRID_NAMES:
        if not os.path.isfile(grid):
            raise click.ClickException(f'--grid: "{grid}" is neither one of {", ".join(grids.GRID_NAMES)} nor a file')
        sigmas = grid_files.read_grid_file(grid)
        if steps_given and num_steps != len(sigmas) - 1:
            raise click.ClickException(f'--steps={num_steps}, but the grid file "{grid}" has {len(sigmas) - 1} steps')
        if sigmas[-2] < net.sigma_min or sigmas[0] > net.sigma_max:
            raise click.ClickException(
                f'Grid file "{grid}" spans [{sigmas[-2]:g}, {sigmas[0]:g}], outside the network\'s noise range '
                f'[{float(net.sigma_min):g}, {float(net.sigma_max):g}]'
            )
        return sigmas, dict(grid='file', file=grid)

    # The range: the user's or the grid's default (EDM's per discretization), clamped to the network as in EDM.
    default_min, default_max = grids.DEFAULT_RANGES.get(grid, grids.DEFAULT_RANGES['edm'])
    sigma_min = max(default_min if opts.sigma_min is None else opts.sigma_min, float(net.sigma_min))
    sigma_max = min(default_max if opts.sigma_max is None else opts.sigma_max, float(net.sigma_max))
    if sigma_min >= sigma_max:
        raise click.ClickException(
            f'Empty noise range for this network: sigma_min={sigma_min:g} >= sigma_max={sigma_max:g}'
        )
    info = dict(grid=grid, sigma_min=sigma_min, sigma_max=sigma_max)
    profile = variances = None
    if grid == 'edm':
        info.update(rho=opts.rho)
    elif grid == 'infogrid':
        profile, info['profile'] = read_profile(opts.profile, loaded)
    elif grid == 'tangent':
        variances = read_variances(opts.variances, getattr(net, 'sigma_data', None))
        scale = f'scale {math.sqrt(variances[0]):g}' if len(variances) == 1 else f'{len(variances)} variances'
        info.update(variances=opts.variances or scale)
    grid_kwargs = dict(rho=opts.rho, profile=profile, variances=variances)
    return grids.build_grid(grid, num_steps, sigma_min, sigma_max, **grid_kwargs), info


# ----------------------------------------------------------------------------------------------------------------------
# Checks and output records.


def check_options(ctx: click.Context, opts: dnnlib.EasyDict) -> None:
    """Checks that need no network: --disc against --grid (EDM's name for it), --guide-network against --guidance,
    --profile and --variances against --grid, and an output layout whose folder fid.py can read (no grid PNG inside
    it). Sets opts.grid from --disc."""
    if opts.discretization is not None:
        if ctx.get_parameter_source('grid') != click.core.ParameterSource.DEFAULT and opts.grid != opts.discretization:
            raise click.ClickException(f'--disc={opts.discretization} contradicts --grid={opts.grid}; give one of them')
        opts.grid = opts.discretization
    if opts.guide_network is not None and opts.guidance == 1:
        raise click.ClickException(
            '--guide-network has no effect with --guidance=1 (the unguided sampler); give W != 1'
        )
    if opts.profile is not None and opts.grid != 'infogrid':
        raise click.ClickException(f'--profile is used by --grid=infogrid, not --grid={opts.grid}')
    if opts.variances is not None and opts.grid != 'tangent':
        raise click.ClickException(f'--variances is used by --grid=tangent, not --grid={opts.grid}')
    outdir, grid_png = os.path.abspath(opts.outdir), opts.grid_png
    if grid_png is not None and os.path.commonpath([os.path.abspath(grid_png), outdir]) == outdir:
        raise click.ClickException(
            f'--grid-png "{grid_png}" is inside --outdir, whose images fid.py reads; write it elsewhere'
        )
    cli.check_output_dir(opts.outdir, '--outdir')


def check_network(net, opts: dnnlib.EasyDict) -> bool:
    """Check the options against the loaded network; whether it is a sequence (DNA) network."""
    is_sequence = isinstance(getattr(net, 'model', None), SequenceUNet)
    image_flags = [
        flag
        for name, flag in (('grid_png', '--grid-png'), ('binarize', '--binarize'), ('subdirs', '--subdirs'))
        if opts[name]
    ]
    if is_sequence and image_flags:
        raise click.ClickException(f'{image_flags[0]} is for images; a sequence network writes sequences.fasta')
    if opts.class_idx is not None and not net.label_dim:
        raise click.ClickException('--class given, but the network is unconditional')
    if opts.class_idx is not None and opts.class_idx >= net.label_dim:
        raise click.ClickException(f'--class={opts.class_idx} is out of range; the network has {net.label_dim} classes')
    return is_sequence


def load_guide(opts: dnnlib.EasyDict, loaded, device: torch.device):
    """The guide of --guidance: the --guide-network (autoguidance), or None for classifier-free guidance (the main
    network under the null label); nothing at W = 1. One-line errors for a guide that cannot guide this network."""
    net = loaded.net
    if opts.guidance == 1:
        return None
    if opts.guide_network is None:
        if not net.label_dim:
            raise click.ClickException(
                f'--guidance={opts.guidance:g} without --guide-network is classifier-free guidance, which needs a '
                'class-conditional network; this one is unconditional: give --guide-network'
            )
        if not (loaded.network_kwargs or {}).get('label_dropout'):
            dist.print0('Warning: classifier-free guidance, but the network was trained without label dropout (its '
                        'file says so): its output for the null label is untrained')  # fmt: skip
        return None
    dist.print0(f'Loading guide network from "{opts.guide_network}"...')
    try:
        guide = dist.rank0_first(lambda: load_network(opts.guide_network, device=device)).net
    except (OSError, ValueError) as e:
        raise click.ClickException(f'--guide-network: {e}') from None
    for name, what in (('img_resolution', 'resolution'), ('img_channels', 'channels'), ('label_dim', 'label_dim')):
        if int(getattr(guide, name)) != int(getattr(net, name)):
            raise click.ClickException(
                f'--guide-network has {what} {int(getattr(guide, name))}, the network {int(getattr(net, name))}; '
                'the guide must be a network of the same data'
            )
    return guide


def pick_solver(opts: dnnlib.EasyDict, churn: dict) -> dict:
    """`sample_seeds` keyword arguments: EDM's solver (`edm_sampler`), or its ablation solver (`ablation_sampler`)
    for another σ(t) or s(t)."""
    if opts.schedule == 'linear' and opts.scaling == 'none':
        return dict(sampler=edm_sampler, solver=opts.solver, **churn)
    return dict(sampler=ablation_sampler, solver=opts.solver, schedule=opts.schedule, scaling=opts.scaling, **churn)


def write_grid_record(opts: dnnlib.EasyDict, sigmas: torch.Tensor, grid_info: dict, nfe: int, churn: dict) -> None:
    """OUTDIR/grid.json: the sigma-grid used and how it was made (`--grid=OUTDIR/grid.json` reads it back)."""
    os.makedirs(opts.outdir, exist_ok=True)
    churn = {k: v if math.isfinite(v) else str(v) for k, v in churn.items()}  # Strict JSON has no inf.
    record = dict(
        grid_info, network=opts.network_pkl, solver=opts.solver, schedule=opts.schedule, scaling=opts.scaling,
        num_steps=len(sigmas) - 1, nfe=nfe, **churn, binarize=opts.binarize, guidance=opts.guidance,
        sigmas=sigmas.tolist(),
    )  # fmt: skip
    if opts.guidance != 1:  # NFE above counts the main network; guidance doubles it.
        record.update(guide=opts.guide_network or 'null label (classifier-free)')
    with atomic_write(os.path.join(opts.outdir, 'grid.json'), 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=2, allow_nan=False)


# ----------------------------------------------------------------------------------------------------------------------
# Command line.

POSITIVE = cli.FloatRange(min=0, min_open=True)
NON_NEGATIVE = cli.FloatRange(min=0)
POSITIVE_INT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)


# fmt: off
@click.command(context_settings={'show_default': True})
@click.option('--network', 'network_pkl', help='Network snapshot or EDM pickle', metavar='PATH|URL', required=True)
@click.option('--outdir',                 help='Where to save the output images', metavar='DIR', required=True)
@click.option('--seeds',                  help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', type=parse_int_list, default='0-63')
@click.option('--subdirs',                help='Create subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx',     help='Class label  [default: random]', metavar='INT', type=NON_NEGATIVE_INT)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=POSITIVE_INT, default=64)
# Sigma-grid.
@click.option('--grid',                   help='Sigma-grid: edm|infogrid|loguniform|tangent|vp|ve|iddpm or a FILE of sigmas', metavar='NAME|FILE', default='edm')
@click.option('--profile',                help='Information profile for --grid=infogrid (JSON, snapshot or training state)  [default: the network\'s]', metavar='FILE')
@click.option('--variances',              help='Gaussian source of --grid=tangent: its scale, or a JSON file of variances  [default: sigma_data]', metavar='FILE|FLOAT')
@click.option('--steps', 'num_steps',     help='Number of sampling steps', metavar='INT', type=click.IntRange(min=2), default=18)
@click.option('--sigma_min',              help='Lowest noise level  [default: varies]', metavar='FLOAT', type=POSITIVE)
@click.option('--sigma_max',              help='Highest noise level  [default: varies]', metavar='FLOAT', type=POSITIVE)
@click.option('--rho',                    help='Time step exponent of the edm grid', metavar='FLOAT', type=POSITIVE, default=7)
# Solver (EDM's options).
@click.option('--S_churn', 'S_churn',     help='Stochasticity strength', metavar='FLOAT', type=NON_NEGATIVE, default=0)
@click.option('--S_min', 'S_min',         help='Stoch. min noise level', metavar='FLOAT', type=NON_NEGATIVE, default=0)
@click.option('--S_max', 'S_max',         help='Stoch. max noise level', metavar='FLOAT', type=cli.FloatRange(min=0, allow_inf=True), default='inf')
@click.option('--S_noise', 'S_noise',     help='Stoch. noise inflation', metavar='FLOAT', type=cli.FLOAT, default=1)
@click.option('--solver',                 help='Ablate ODE solver', type=click.Choice(['heun', 'euler']), default='heun')
@click.option('--disc', 'discretization', help="Ablate time step discretization (EDM's name for --grid)", type=click.Choice(['vp', 've', 'iddpm', 'edm']))
@click.option('--schedule',               help='Ablate noise level function sigma(t)', type=click.Choice(['vp', 've', 'linear']), default='linear')
@click.option('--scaling',                help='Ablate signal scaling s(t)', type=click.Choice(['vp', 'none']), default='none')
# Output and devices.
@click.option('--grid-png', 'grid_png',   help='Also save all images as one PNG (a sample grid)', metavar='FILE')
@click.option('--grid-scale',             help='Upscale each image of the sample grid by this factor', metavar='INT', type=click.IntRange(min=1, max=64), default=1)
@click.option('--grid-pad',               help='White pixels between and around the images of the sample grid', metavar='INT', type=click.IntRange(min=0, max=256), default=0)
@click.option('--npz',                    help='Also save all images (uint8 NHWC "arr_0") or sequences, seeds and labels in one .npz', metavar='FILE')
@click.option('--binarize',               help='Threshold samples at 0 in [-1, 1] (pixels 0/255)', is_flag=True)
# Guidance (Karras et al. 2024).
@click.option('--guidance',               help='Guidance weight W, 1 = none', metavar='FLOAT', type=cli.FLOAT, default=1)
@click.option('--guide-network',          help='Guide of autoguidance  [default: the null label (CFG)]', metavar='PATH|URL')
@click.option('--device',                 help='Device  [default: cuda if available, else cpu]', type=click.Choice(['cuda', 'cpu']))
# fmt: on
def main(**kwargs):
    """Generate random images using the techniques described in the paper
    "Elucidating the Design Space of Diffusion-Based Generative Models",
    on EDM's sigma-grid or on InfoGrid (InfoNoise paper, Eq. 19).

    Examples:

    \b
    # Generate 64 images and save them as out/*.png
    python generate.py --outdir=out --seeds=0-63 --batch=64 \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    \b
    # The same seeds on InfoGrid, from the profile learned by InfoNoise training
    python generate.py --outdir=out-info --seeds=0-63 --grid=infogrid --steps=18 \\
        --network=training-runs/00000-mnist5k-16x16-uncond-ddpmpp-edm-infonoise-gpus1-batch64-fp32/network-snapshot-000120.pt

    \b
    # Autoguidance (W = 2) by an earlier snapshot of the same run
    python generate.py --outdir=out-guided --seeds=0-63 --guidance=2 \\
        --network=training-runs/.../network-snapshot-000120.pt \\
        --guide-network=training-runs/.../network-snapshot-000030.pt

    \b
    # Generate 1024 images using 2 GPUs, also as one .npz for FID tools
    torchrun --standalone --nproc_per_node=2 generate.py --outdir=out --seeds=0-1023 --batch=64 \\
        --npz=out.npz --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    The noise range [sigma_min, sigma_max] defaults to [0.002, 80], or to EDM's range of the vp/ve/iddpm
    discretization, and is always clamped to the range the network supports, as in EDM. With Heun's solver,
    N steps cost 2N-1 network evaluations (NFE); with Euler's, N. The grid used is written to OUTDIR/grid.json.
    --profile (InfoGrid) defaults to the InfoNoise profile stored in the network file; --variances (tangent) to
    one scale, the network's sigma_data. --guidance=W != 1 calls a guide at every step: the --guide-network
    (autoguidance), else the network itself with the null (all-zero) label (classifier-free guidance, for a
    class-conditional network trained with train.py --label-dropout).
    """
    ctx = click.get_current_context()
    opts = dnnlib.EasyDict(kwargs)
    churn = {k: opts.pop(k) for k in ('S_churn', 'S_min', 'S_max', 'S_noise')}
    check_options(ctx, opts)
    outdir, seeds, subdirs = opts.outdir, opts.seeds, opts.subdirs
    try:
        device = dist.init(opts.device)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    dist.print0(f'CPU threads: {misc.set_cpu_threads()}')
    dist.print0(f'Loading network from "{opts.network_pkl}"...')
    try:
        loaded = dist.rank0_first(lambda: load_network(opts.network_pkl, device=device))
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    net, is_sequence = loaded.net, check_network(loaded.net, opts)
    guide = load_guide(opts, loaded, device)

    # Build the sigma-grid and record it next to the images.
    steps_given = ctx.get_parameter_source('num_steps') != click.core.ParameterSource.DEFAULT
    try:
        sigmas, grid_info = resolve_grid(opts, steps_given, loaded)
    except ValueError as e:
        raise click.ClickException(f'--grid={opts.grid}: {e}') from None
    num_steps = len(sigmas) - 1
    nfe = grids.nfe(num_steps, opts.solver)
    if dist.get_rank() == 0:
        with cli.disk_errors(f'"{os.path.join(outdir, "grid.json")}"'):
            write_grid_record(opts, sigmas, grid_info, nfe, churn)

    # Generate, writing each batch's images as it comes (sequences are collected and written at the end).
    how = f'{opts.grid} grid, {opts.solver}, {num_steps} steps, {nfe} NFE' + (
        f', guidance {opts.guidance:g}' if opts.guidance != 1 else ''
    )
    dist.print0(f'Generating {len(seeds)} images to "{outdir}" ({how})...')
    rank_labels, rank_tokens = {}, {}
    kwargs = dict(class_idx=opts.class_idx, binarize=opts.binarize, guidance=opts.guidance, guide=guide)
    kwargs.update(pick_solver(opts, churn))
    with cli.disk_errors(f'the images in "{outdir}"'):
        for batch_seeds, images, labels in generate_images(net, seeds, sigmas, device, opts.max_batch_size, **kwargs):
            if labels is not None:
                rank_labels.update(zip(batch_seeds, labels.tolist()))
            if is_sequence:
                rank_tokens.update(zip(batch_seeds, sequences.to_tokens(images)))
            else:
                write_images(outdir, batch_seeds, images, subdirs)

    # Collect all ranks' outputs into sequences.fasta, one PNG grid and/or one .npz.
    dist.barrier()
    labels = {seed: label for part in dist.all_gather_object(rank_labels) for seed, label in part.items()}
    tokens = {seed: row for part in dist.all_gather_object(rank_tokens) for seed, row in part.items()}
    with cli.disk_errors('the outputs (' + ', '.join(f'"{p}"' for p in (outdir, opts.grid_png, opts.npz) if p) + ')'):
        if dist.get_rank() == 0 and is_sequence:
            write_sequences(outdir, opts.npz, seeds, tokens, labels if net.label_dim else None)
        elif dist.get_rank() == 0 and (opts.grid_png is not None or opts.npz is not None):
            write_image_collections(outdir, seeds, subdirs, labels, opts.grid_png, opts.npz, opts.grid_scale, opts.grid_pad)
    dist.print0('Done.')
    dist.shutdown()


if __name__ == '__main__':
    main()
