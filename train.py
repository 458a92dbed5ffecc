"""Train diffusion models with EDM's recipe (Karras et al. 2022) and a pluggable training noise sampler.

The command line turns into one flat config of `*_kwargs` dicts (each with a `class_name`) handed to
`training.training_loop.training_loop`, exactly as in EDM; every EDM flag keeps its name and meaning.
"""

import json
import os
import re
import secrets
import warnings

import click
import numpy as np
import torch

import dnnlib
from dnnlib import cli
from infonoise.grids import VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T
from infonoise.pivot import is_discrete
from infonoise.samplers import VPSampler
from torch_utils import distributed as dist
from training import checkpoint, training_loop

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')  # False warning printed by PyTorch.

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')

# Architecture presets of EDM's train.py.
ARCH_KWARGS = {
    'ddpmpp': dict(
        model_type='SongUNet',
        embedding_type='positional',
        encoder_type='standard',
        decoder_type='standard',
        channel_mult_noise=1,
        resample_filter=[1, 1],
        model_channels=128,
        channel_mult=[2, 2, 2],
    ),
    'ncsnpp': dict(
        model_type='SongUNet',
        embedding_type='fourier',
        encoder_type='residual',
        decoder_type='standard',
        channel_mult_noise=2,
        resample_filter=[1, 3, 3, 1],
        model_channels=128,
        channel_mult=[2, 2, 2],
    ),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
    # Not EDM's: the 1-D DDPM++ analogue for DNA sequences (training/networks.py, SequenceUNet).
    'ddpmpp1d': dict(model_type='SequenceUNet', model_channels=128, channel_mult=[1, 2, 2], num_blocks=2),
}
SEQUENCE_ARCHS = ('ddpmpp1d',)
PRECOND_CLASS = {'vp': 'VPPrecond', 've': 'VEPrecond', 'edm': 'EDMPrecond'}

# Each preconditioning's own training distribution and loss weight (EDM Table 1), used for 'auto'.
PRECOND_SAMPLER = {'edm': 'lognormal', 'vp': 'vp', 've': 'loguniform'}
PRECOND_WEIGHT = {'edm': 'edm', 'vp': 'inverse-variance', 've': 'inverse-variance'}
# EDM's σ ranges: the EDM sampling range, VEPrecond's, and VP's σ(ε_t)..σ(1) (the VP sampler's icdf at u = 1 and 0).
PRECOND_SIGMA_RANGE = {
    'edm': (0.002, 80.0),
    've': (0.02, 100.0),
    'vp': tuple(float(s) for s in VPSampler().icdf(torch.tensor([1.0, 0.0], dtype=torch.float64))),
}
SAMPLER_KWARGS = {
    'lognormal': lambda precond: dict(class_name='infonoise.samplers.LogNormal', P_mean=-1.2, P_std=1.2),
    'loguniform': lambda precond: dict(
        class_name='infonoise.samplers.LogUniform',
        sigma_min=PRECOND_SIGMA_RANGE[precond][0],
        sigma_max=PRECOND_SIGMA_RANGE[precond][1],
    ),
    'vp': lambda precond: dict(
        class_name='infonoise.samplers.VPSampler', beta_d=VP_BETA_D, beta_min=VP_BETA_MIN, epsilon_t=VP_EPSILON_T
    ),
}


def apply_preset(ctx: click.Context, opts: dict) -> None:
    """Fill the options the user did not set from configs/<preset>.json."""
    path = os.path.join(CONFIGS_DIR, f'{opts["preset"]}.json')
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(CONFIGS_DIR) if f.endswith('.json'))
        raise click.ClickException(f'Unknown preset "{opts["preset"]}"; available: {", ".join(names)}')
    with open(path) as f:
        preset = json.load(f)
    params = {p.name: p for p in ctx.command.params}
    for key, value in preset.items():
        name = key.replace('-', '_')
        if key.startswith('_'):
            continue  # Comments.
        if name not in params or name in ('preset', 'outdir', 'data'):
            raise click.ClickException(f'Preset "{opts["preset"]}" sets unknown or non-presettable option "{key}"')
        if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT:
            opts[name] = params[name].type_cast_value(ctx, value)


def is_discrete_dataset(dataset_obj, max_images: int = 256) -> bool:
    """Whether the data has discrete endpoints: pixels only at the two extremes (e.g. binarised MNIST)."""
    idx = np.linspace(0, len(dataset_obj) - 1, min(len(dataset_obj), max_images)).round().astype(np.int64)
    return is_discrete(np.stack([dataset_obj[int(i)][0] for i in idx]))


def infonoise_kwargs(opts: dnnlib.EasyDict, weight: str, discrete_data: bool) -> dnnlib.EasyDict:
    """InfoNoise's constructor arguments from the --info-* options."""
    sigma_min, sigma_max = PRECOND_SIGMA_RANGE[opts.precond]
    endpoint = opts.info_endpoint if opts.info_endpoint != 'auto' else ('discrete' if discrete_data else 'continuous')
    return dnnlib.EasyDict(
        class_name='infonoise.InfoNoise', weight=weight, sigma_data=0.5,
        sigma_min=opts.info_sigma_min or sigma_min, sigma_max=opts.info_sigma_max or sigma_max,
        num_bins=opts.info_bins, buffer_size=opts.info_buffer, ema_rate=opts.info_beta,
        refresh_kimg=opts.info_refresh, warmup_kimg=opts.info_warmup, min_count=opts.info_nmin,
        gate_n=opts.info_gate_n, onset_p=opts.info_p, smoothing=opts.info_smooth, endpoint=endpoint,
        pivot=opts.info_pivot, base=opts.info_base, floor=opts.info_floor,
    )  # fmt: skip


def next_run_dir(outdir: str, desc: str) -> str:
    """OUTDIR/NNNNN-DESC with NNNNN one above the highest run id in `outdir` (EDM's numbering)."""
    names = [x for x in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, x))] if os.path.isdir(outdir) else []
    ids = [int(m.group()) for m in (re.match(r'^\d+', x) for x in names) if m is not None]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def create_run_dir(outdir: str, desc: str) -> str:
    """Create the next run directory exclusively: a job that lists `outdir` at the same time as another and loses the
    race to create the directory takes the next id, so two runs never share one."""
    os.makedirs(outdir, exist_ok=True)
    while True:
        run_dir = next_run_dir(outdir, desc)
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:
            continue


def find_resume_state(path: str) -> str:
    """A training-state-*.pt file (ours or EDM's), or the newest one in a run directory."""
    if os.path.isdir(path):
        # By kimg as a number: past 999,999 kimg the names grow a digit and text order would pick an older state.
        states = [f for f in os.listdir(path) if re.fullmatch(r'training-state-\d+\.pt', f)]
        if not states:
            raise click.ClickException(f'--resume: no training-state-*.pt in "{path}"')
        return os.path.join(path, max(states, key=lambda f: int(re.sub(r'\D', '', f))))
    if not os.path.isfile(path):
        raise click.ClickException(f'--resume: no such file or directory "{path}"')
    return path


# fmt: off
@click.command()
# Main options.
@click.option('--outdir',     help='Where to save the results', metavar='DIR',                       type=str, required=True)
@click.option('--data',       help='Path to the dataset', metavar='ZIP|DIR|NPZ',                         type=str, required=True)
@click.option('--preset',     help='Fill unset options from configs/NAME.json', metavar='NAME',      type=str)
@click.option('--cond',       help='Train class-conditional model', metavar='BOOL',                  type=bool, default=False, show_default=True)
@click.option('--arch',       help='Network architecture',                                           type=click.Choice(['ddpmpp', 'ncsnpp', 'adm', 'ddpmpp1d']), default='ddpmpp', show_default=True)
@click.option('--precond',    help='Preconditioning & loss function',                                type=click.Choice(['vp', 've', 'edm']), default='edm', show_default=True)
@click.option('--sampler',    help="Training noise sampler (auto = the precond's own)",              type=click.Choice(['auto', 'lognormal', 'loguniform', 'vp', 'infonoise']), default='auto', show_default=True)
@click.option('--weight',     help="Loss weight (auto = the precond's own)",                         type=click.Choice(['auto', 'edm', 'inverse-variance', 'uniform']), default='auto', show_default=True)

# InfoNoise (--sampler=infonoise); see the README for how the defaults were chosen.
@click.option('--info-bins',     help='InfoNoise: log-spaced intervals K', metavar='INT',                type=click.IntRange(min=2), default=64, show_default=True)
@click.option('--info-buffer',   help='InfoNoise: FIFO capacity B per interval', metavar='INT',          type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--info-beta',     help='InfoNoise: EMA rate of the per-interval loss', metavar='FLOAT',   type=cli.FloatRange(min=0, max=1, min_open=True), default=0.25, show_default=True)
@click.option('--info-refresh',  help='InfoNoise: refresh period M', metavar='KIMG',                     type=cli.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--info-warmup',   help='InfoNoise: warm-up N_warm under the base sampler', metavar='KIMG', type=cli.FloatRange(min=0), default=1000, show_default=True)
@click.option('--info-nmin',     help='InfoNoise: losses N_min per interval before a refresh', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--info-gate-n',   help='InfoNoise: gate exponent n', metavar='FLOAT',                     type=cli.FloatRange(min=0, min_open=True), default=3, show_default=True)
@click.option('--info-p',        help='InfoNoise: onset threshold p', metavar='FLOAT',                   type=cli.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.002, show_default=True)
@click.option('--info-smooth',   help='InfoNoise: peak-preserving smoothing width, 0 = off', metavar='BINS', type=cli.FloatRange(min=0), default=1, show_default=True)
@click.option('--info-endpoint', help='InfoNoise: endpoint type (auto = detect from the data)',          type=click.Choice(['auto', 'continuous', 'discrete']), default='auto', show_default=True)
@click.option('--info-pivot',    help='InfoNoise: fixed pivot c  [default: calibrated]', metavar='FLOAT', type=cli.FloatRange(min=0, min_open=True))
@click.option('--info-base',     help='InfoNoise: base sampler for the warm-up',                         type=click.Choice(['lognormal', 'loguniform']), default='lognormal', show_default=True)
@click.option('--info-floor',    help='InfoNoise: log-uniform mixing floor', metavar='FLOAT',           type=cli.FloatRange(min=0, max=1), default=0.05, show_default=True)
@click.option('--info-sigma-min', help="InfoNoise: lowest σ  [default: the precond's]", metavar='FLOAT', type=cli.FloatRange(min=0, max=1e6, min_open=True))
@click.option('--info-sigma-max', help="InfoNoise: highest σ  [default: the precond's]", metavar='FLOAT', type=cli.FloatRange(min=0, max=1e6, min_open=True))

# Hyperparameters.
@click.option('--duration',   help='Training duration', metavar='MIMG',                              type=cli.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',      help='Total batch size', metavar='INT',                                type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu',  help='Limit batch size per GPU', metavar='INT',                        type=click.IntRange(min=1))
@click.option('--cbase',      help='Channel multiplier  [default: varies]', metavar='INT',           type=click.IntRange(min=1))
@click.option('--cres',       help='Channels per resolution  [default: varies]', metavar='LIST',     type=dnnlib.util.parse_int_list)
@click.option('--blocks',     help='Residual blocks per resolution  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--attn',       help='Resolutions with self-attention  [default: varies]', metavar='LIST', type=dnnlib.util.parse_int_list)
@click.option('--lr',         help='Learning rate', metavar='FLOAT',                                 type=cli.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option('--lr-rampup',  help='Learning rate ramp-up', metavar='KIMG',                          type=cli.FloatRange(min=0), default=10000, show_default=True)
@click.option('--ema',        help='EMA half-life', metavar='MIMG',                                  type=cli.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--dropout',    help='Dropout probability', metavar='FLOAT',                           type=cli.FloatRange(min=0, max=1), default=0.13, show_default=True)
@click.option('--augment',    help='Augment probability', metavar='FLOAT',                           type=cli.FloatRange(min=0, max=1), default=0.12, show_default=True)
@click.option('--xflip',      help='Enable dataset x-flips', metavar='BOOL',                         type=bool, default=False, show_default=True)

# Performance-related.
@click.option('--fp16',       help='Enable mixed-precision training (EDM fp16 nets, CUDA)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--bf16',       help='Run the network under bfloat16 autocast', metavar='BOOL',        type=bool, default=False, show_default=True)
@click.option('--compile',    help='Wrap the network in torch.compile', metavar='BOOL',              type=bool, default=False, show_default=True)
@click.option('--ls',         help='Loss scaling', metavar='FLOAT',                                  type=cli.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench',      help='Enable cuDNN benchmarking', metavar='BOOL',                      type=bool, default=True, show_default=True)
@click.option('--cache',      help='Cache dataset in CPU memory', metavar='BOOL',                    type=bool, default=True, show_default=True)
@click.option('--workers',    help='DataLoader worker processes (0 = main process)', metavar='INT',  type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--device',     help='Device  [default: cuda if available]',                           type=click.Choice(['cuda', 'cpu']))

# I/O-related.
@click.option('--desc',       help='String to include in result dir name', metavar='STR',            type=str)
@click.option('--nosubdir',   help='Do not create a subdirectory for results',                       is_flag=True)
@click.option('--tick',       help='How often to print progress', metavar='KIMG',                    type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--snap',       help='How often to save snapshots', metavar='TICKS',                   type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--dump',       help='How often to dump state', metavar='TICKS',                       type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--seed',       help="Random seed  [default: random, or the resumed run's]", metavar='INT', type=int)
@click.option('--transfer',   help='Transfer learning from network snapshot or EDM pickle', metavar='PT|PKL|URL', type=str)
@click.option('--resume',     help="Resume from a training state (ours or EDM's) or run directory", metavar='PT|DIR', type=str)
@click.option('-n', '--dry-run', help='Print training options and exit',                             is_flag=True)
# fmt: on
def main(**kwargs):
    """Train a diffusion model with EDM's recipe and a pluggable training noise sampler.

    \b
    Small real demo on one CPU (MNIST-5k at 16x16, built by dataset_tool.py):
    python train.py --outdir=runs --data=datasets/mnist5k-16x16.zip --preset=demo-mnist16

    \b
    Train DDPM++ for class-conditional CIFAR-10 using 8 GPUs (EDM's command):
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp
    """
    opts = dnnlib.EasyDict(kwargs)
    ctx = click.get_current_context()
    if opts.preset is not None:
        apply_preset(ctx, opts)
    torch.multiprocessing.set_start_method('spawn', force=True)
    if not opts.dry_run:
        cli.check_output_dir(opts.outdir, '--outdir')
    try:
        device = dist.init(opts.device)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    world = dist.get_world_size()

    # Initialize config dict.
    c = dnnlib.EasyDict()
    is_sequence_data = opts.data.lower().endswith('.npz')
    c.dataset_kwargs = dnnlib.EasyDict(
        class_name=f'training.dataset.{"SequenceDataset" if is_sequence_data else "ImageFolderDataset"}',
        path=opts.data,
        use_labels=opts.cond,
        xflip=opts.xflip,
        cache=opts.cache,
    )
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=device.type == 'cuda', num_workers=opts.workers)
    if opts.workers > 0:
        c.data_loader_kwargs.prefetch_factor = 2
    c.network_kwargs = dnnlib.EasyDict()
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)

    # Validate dataset options.
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
        c.dataset_kwargs.resolution = dataset_obj.resolution  # Be explicit about dataset resolution.
        c.dataset_kwargs.max_size = len(dataset_obj)  # Be explicit about dataset size.
        img_channels, label_dim = dataset_obj.num_channels, dataset_obj.label_dim
        discrete_data = opts.sampler == 'infonoise' and opts.info_endpoint == 'auto' and is_discrete_dataset(dataset_obj)
        del dataset_obj  # Conserve memory.
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--data: {err}') from None

    # Sequences (DNA) need the 1-D network and have no geometric augmentation; their x-flip is the reverse complement.
    if is_sequence_data != (opts.arch in SEQUENCE_ARCHS):
        if is_sequence_data:
            raise click.ClickException(f'--data={opts.data} holds sequences; train them with --arch=ddpmpp1d')
        raise click.ClickException(f'--arch={opts.arch} is for sequence datasets (.npz made by dataset_tool.py)')
    if is_sequence_data and opts.augment:
        if ctx.get_parameter_source('augment') == click.core.ParameterSource.COMMANDLINE:
            raise click.ClickException('--augment is for images; sequences use --xflip=1 (reverse complements)')
        opts.augment = 0

    # Network architecture.
    c.network_kwargs.update(ARCH_KWARGS[opts.arch])
    c.network_kwargs.class_name = f'training.networks.{PRECOND_CLASS[opts.precond]}'
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        c.network_kwargs.channel_mult = opts.cres
    if opts.blocks is not None:
        c.network_kwargs.num_blocks = opts.blocks
    if opts.attn is not None:
        c.network_kwargs.attn_resolutions = opts.attn
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment)
        c.augment_kwargs.update(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        c.network_kwargs.augment_dim = 9
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)

    # Loss weight and noise sampler.
    weight = PRECOND_WEIGHT[opts.precond] if opts.weight == 'auto' else opts.weight
    c.loss_kwargs = dnnlib.EasyDict(class_name='training.loss.DenoisingLoss', weight=weight, sigma_data=0.5)
    sampler = PRECOND_SAMPLER[opts.precond] if opts.sampler == 'auto' else opts.sampler
    if sampler == 'infonoise':
        c.noise_kwargs = infonoise_kwargs(opts, weight, discrete_data)
    else:
        given = [f'--{name.replace("_", "-")}' for name in opts if name.startswith('info_') and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.ClickException(f'{given[0]} only applies to --sampler=infonoise')
        c.noise_kwargs = dnnlib.EasyDict(SAMPLER_KWARGS[sampler](opts.precond))
    try:  # Every sampler option is checked here, before anything is written.
        noise_sampler = dnnlib.util.construct_class_by_name(**c.noise_kwargs)
    except ValueError as e:
        raise click.ClickException(f'--sampler={sampler}: {e}') from None

    # Training options.
    c.total_kimg = max(int(opts.duration * 1000), 1)
    c.ema_halflife_kimg = opts.ema * 1000
    c.lr_rampup_kimg = opts.lr_rampup
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu)
    c.update(loss_scaling=opts.ls, cudnn_benchmark=opts.bench, bf16=opts.bf16, compile=opts.compile)
    c.update(kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump)
    if opts.fp16 and opts.bf16:
        raise click.ClickException('--fp16 and --bf16 are mutually exclusive')
    batch_gpu = opts.batch_gpu or opts.batch // world
    if opts.batch % world != 0 or (opts.batch // world) % min(batch_gpu, opts.batch // world) != 0:
        raise click.ClickException(f'--batch={opts.batch} must be divisible by {world} ranks × --batch-gpu={batch_gpu}')

    # Transfer learning and resume.
    if opts.transfer is not None and opts.resume is not None:
        raise click.ClickException('--transfer and --resume cannot be specified at the same time')
    if opts.transfer is not None:
        try:
            checkpoint.load_network(opts.transfer)
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--transfer: {str(e).splitlines()[0]}') from None
        c.transfer = opts.transfer
        c.ema_rampup_ratio = None
    seed = opts.seed
    if opts.resume is not None:
        c.resume_state = os.path.abspath(find_resume_state(opts.resume))
        net_kwargs = dict(
            c.network_kwargs, img_resolution=c.dataset_kwargs.resolution, img_channels=img_channels, label_dim=label_dim
        )
        try:
            state = checkpoint.load_training_state(c.resume_state, net_kwargs, c.noise_kwargs)
            if state['noise_sampler'] is not None:
                noise_sampler.load_state_dict(state['noise_sampler'])  # Same bins, buffers, ... as this run's?
        except (OSError, ValueError, KeyError) as e:
            raise click.ClickException(f'--resume: {e}') from None
        if seed is None:
            seed = state['seed']  # Continue the same random streams; EDM's states have none (random, as EDM).
        del state

    # Random seed.
    if seed is None:
        seed = dist.broadcast_object(secrets.randbelow(1 << 31))
    c.seed = seed

    # Description string.
    cond_str = 'cond' if c.dataset_kwargs.use_labels else 'uncond'
    dtype_str = 'fp16' if opts.fp16 else 'bf16' if opts.bf16 else 'fp32'
    desc = f'{os.path.splitext(os.path.basename(opts.data.rstrip("/")))[0]}-{cond_str}-{opts.arch}-{opts.precond}-{sampler}-gpus{world}-batch{c.batch_size}-{dtype_str}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'

    # Pick output directory.
    if dist.get_rank() != 0:
        c.run_dir = None
    elif opts.nosubdir:
        c.run_dir = opts.outdir
        # A run directory holds one run: continuing it in place needs --resume from a state inside it.
        in_place = opts.resume is not None and os.path.dirname(c.resume_state) == os.path.abspath(opts.outdir)
        if os.path.isfile(os.path.join(opts.outdir, 'training_options.json')) and not (in_place or opts.dry_run):
            raise click.ClickException(
                f'--nosubdir: {opts.outdir} already holds a run; use another --outdir, or --resume from its state'
            )
    else:
        c.run_dir = next_run_dir(opts.outdir, desc)
    c.run_dir = dist.broadcast_object(c.run_dir)

    # Print options.
    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Output directory:        {c.run_dir}')
    dist.print0(f'Dataset path:            {c.dataset_kwargs.path}')
    dist.print0(f'Class-conditional:       {c.dataset_kwargs.use_labels}')
    dist.print0(f'Network architecture:    {opts.arch}')
    dist.print0(f'Preconditioning & loss:  {opts.precond} (weight {weight})')
    settings = ', '.join(f'{k}={v}' for k, v in c.noise_kwargs.items() if k != 'class_name')
    dist.print0(f'Noise sampler:           {c.noise_kwargs.class_name}' + (f' ({settings})' if settings else ''))
    dist.print0(f'Device:                  {device} x {world}')
    dist.print0(f'Duration:                {c.total_kimg} kimg')
    dist.print0(f'Batch size:              {c.batch_size}')
    dist.print0(f'Learning rate:           {c.optimizer_kwargs.lr:g} (ramp-up {c.lr_rampup_kimg:g} kimg)')
    dist.print0(f'EMA half-life:           {c.ema_halflife_kimg:g} kimg')
    dist.print0(f'Precision:               {dtype_str}')
    dist.print0()

    # Dry run? It also shows what the training loop would say first about the noise sampler.
    if opts.dry_run:
        sampler = dnnlib.util.construct_class_by_name(**c.noise_kwargs)
        for line in sampler.schedule_report(c.total_kimg * 1000, c.batch_size):
            dist.print0(line)
        dist.print0('Dry run; exiting.')
        dist.shutdown()
        return

    # Create output directory.
    dist.print0('Creating output directory...')
    logger = None
    if dist.get_rank() == 0:
        if opts.nosubdir:
            os.makedirs(c.run_dir, exist_ok=True)
        else:
            run_dir = create_run_dir(opts.outdir, desc)
            if run_dir != c.run_dir:
                dist.print0(f'{c.run_dir} was taken meanwhile; output directory: {run_dir}')
            c.run_dir = run_dir
    c.run_dir = dist.broadcast_object(c.run_dir)
    if dist.get_rank() == 0:
        with open(os.path.join(c.run_dir, 'training_options.json'), 'w') as f:
            json.dump(c, f, indent=2)
        logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)

    # Train.
    try:
        training_loop.training_loop(**c, device=device)
    finally:
        if logger is not None:
            logger.close()
        dist.shutdown()


if __name__ == '__main__':
    main()
