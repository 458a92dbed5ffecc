"""Train diffusion models with EDM's recipe (Karras et al. 2022) and a pluggable training noise sampler.

The command line turns into one flat config of `*_kwargs` dicts (each with a `class_name`) handed to
`training.training_loop.training_loop`, exactly as in EDM; every EDM flag keeps its name and meaning.
"""

import json
import os
import secrets
import shutil
import sys
import warnings

import click
import numpy as np
import torch

import dnnlib
from dnnlib import cli
from infonoise.pivot import is_discrete
from torch_utils import distributed as dist
from torch_utils import misc
from training import checkpoint, live_log, options, phema, resume, run_dir, training_loop
from training.dataset import CorruptImageError

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')  # False warning printed by PyTorch.

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


def attn_list(value: str | list[int]) -> list[int]:
    """--attn: a list of resolutions, or 'none' for a network without self-attention."""
    return [] if isinstance(value, str) and value.strip().lower() == 'none' else dnnlib.util.parse_int_list(value)


def options_of(ctx: click.Context) -> tuple[dnnlib.EasyDict, set[str]]:
    """The command line's options with the preset filling those the user did not set, and the names the user set."""
    fixed = ('preset', 'outdir', 'data', 'resume', 'allow_changes', 'dry_run')
    return cli.options_with_preset(ctx, ctx.params['preset'], CONFIGS_DIR, fixed)


def is_discrete_dataset(dataset_obj, max_images: int = 256) -> bool:
    """Whether the data has discrete endpoints: pixels only at the two extremes (e.g. binarised MNIST)."""
    idx = np.linspace(0, len(dataset_obj) - 1, min(len(dataset_obj), max_images)).round().astype(np.int64)
    return is_discrete(np.stack([dataset_obj[int(i)][0] for i in idx]))


def dataset_config(opts: dnnlib.EasyDict, given: set[str]) -> tuple[dnnlib.EasyDict, dnnlib.EasyDict]:
    """The dataset's kwargs, read once to check it and record its resolution and size, and what the rest of the
    config needs to know about it (channels, label_dim, discrete endpoints)."""
    is_sequence_data = opts.data.lower().endswith('.npz')
    kwargs = dnnlib.EasyDict(
        class_name=f'training.dataset.{"SequenceDataset" if is_sequence_data else "ImageFolderDataset"}',
        path=opts.data, use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache,
    )  # fmt: skip
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**kwargs)
        kwargs.resolution = dataset_obj.resolution  # Be explicit about dataset resolution.
        kwargs.max_size = len(dataset_obj)  # Be explicit about dataset size.
        discrete = opts.sampler == 'infonoise' and opts.info_endpoint == 'auto' and is_discrete_dataset(dataset_obj)
        facts = dnnlib.EasyDict(channels=dataset_obj.num_channels, label_dim=dataset_obj.label_dim, discrete=discrete)
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--data: {err}') from None

    # Sequences (DNA) need the 1-D network and have no geometric augmentation; their x-flip is the reverse complement.
    if is_sequence_data != (opts.arch in options.SEQUENCE_ARCHS):
        if is_sequence_data:
            raise click.ClickException(f'--data={opts.data} holds sequences; train them with --arch=ddpmpp1d')
        raise click.ClickException(f'--arch={opts.arch} is for sequence datasets (.npz made by dataset_tool.py)')
    if is_sequence_data and opts.augment:
        if 'augment' in given:
            raise click.ClickException('--augment is for images; sequences use --xflip=1 (reverse complements)')
        opts.augment = 0
    if is_sequence_data and opts.snap_grid:
        raise click.ClickException('--snap-grid is for images; a sequence network has no sample grid')
    return kwargs, facts


def setup_training_config(
    opts: dnnlib.EasyDict, given: set[str] = frozenset(), world_size: int = 1, device: torch.device | str = 'cpu'
) -> dnnlib.EasyDict:
    """EDM's flat config of `*_kwargs` dicts for `training_loop` from the options (presets already applied).

    Every option, and every file an option names (dataset, --transfer, --resume), is checked here, before anything
    is written; the first problem is a click.ClickException. `given` names the options set on the command line. The
    seed is left None when neither --seed nor the resumed state gives one.
    """
    device = torch.device(device)
    c = dnnlib.EasyDict()
    c.dataset_kwargs, data = dataset_config(opts, given)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=device.type == 'cuda', num_workers=opts.workers)
    if opts.workers > 0:
        c.data_loader_kwargs.prefetch_factor = 2
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)

    # Network architecture, built once on the meta device to check every shape option.
    c.network_kwargs = dnnlib.EasyDict(options.ARCH_KWARGS[opts.arch])
    c.network_kwargs.class_name = f'training.networks.{options.PRECOND_CLASS[opts.precond]}'
    overrides = dict(cbase='model_channels', cres='channel_mult', blocks='num_blocks', attn='attn_resolutions')
    c.network_kwargs.update({key: opts[option] for option, key in overrides.items() if opts[option] is not None})
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment)
        c.augment_kwargs.update(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        c.network_kwargs.augment_dim = 9
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)
    if opts.label_dropout > 0:  # EDM's own network option; absent at 0, so that configs stay EDM's.
        if not opts.cond:
            raise click.ClickException('--label-dropout drops class labels; it needs --cond=1')
        c.network_kwargs.label_dropout = opts.label_dropout
    if opts.weight == 'learned':  # EDM2's u(σ); absent otherwise, so that configs and EDM pickles stay as they were.
        c.network_kwargs.uncertainty_channels = options.UNCERTAINTY_CHANNELS
    try:
        options.check_network(c, data, opts, device)
    except ValueError as e:
        raise click.ClickException(str(e)) from None

    # Loss weight and noise sampler; every noise sampler option is checked by building it once.
    weight = options.PRECOND_WEIGHT[opts.precond] if opts.weight in ('auto', 'learned') else opts.weight
    c.loss_kwargs = dnnlib.EasyDict(class_name='training.loss.DenoisingLoss', weight=weight, sigma_data=0.5)
    if opts.weight == 'learned':
        c.loss_kwargs.learned_uncertainty = True
    sampler = options.PRECOND_SAMPLER[opts.precond] if opts.sampler == 'auto' else opts.sampler
    if 'curriculum_switch' in given and sampler != 'curriculum':
        raise click.ClickException('--curriculum-switch only applies to --sampler=curriculum')
    if sampler == 'infonoise':
        c.noise_kwargs = options.infonoise_kwargs(opts, weight, data.discrete)
    elif sampler == 'kingma-gao':
        try:
            c.noise_kwargs = options.kingma_gao_kwargs(opts, weight, given)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    elif info_given := sorted(name for name in given if name.startswith('info_')):
        raise click.ClickException(f'--{info_given[0].replace("_", "-")} only applies to --sampler=infonoise')
    else:
        c.noise_kwargs = dnnlib.EasyDict(options.SAMPLER_KWARGS[sampler](opts.precond))
        if sampler == 'curriculum':
            c.noise_kwargs.switch_kimg = opts.curriculum_switch * max(int(opts.duration * 1000), 1)
    try:
        dnnlib.util.construct_class_by_name(**c.noise_kwargs)
    except ValueError as e:
        raise click.ClickException(f'--sampler={sampler}: {e}') from None

    # Training options.
    c.total_kimg = max(int(opts.duration * 1000), 1)
    c.ema_halflife_kimg = opts.ema * 1000
    if opts.ema_profiles is not None:  # Absent otherwise, so that EDM's configs stay as they were.
        c.ema_profiles, c.ema_profile_every = opts.ema_profiles, opts.ema_profile_every
    elif 'ema_profile_every' in given:
        raise click.ClickException('--ema-profile-every only applies with --ema-profiles')
    c.lr_rampup_kimg = opts.lr_rampup
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu)
    c.update(loss_scaling=opts.ls, cudnn_benchmark=opts.bench, bf16=opts.bf16, compile=opts.compile)
    c.update(kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump)
    c.update(snapshot_grid=opts.snap_grid, snapshot_grid_scale=opts.snap_grid_scale, verbose=opts.verbose)
    c.tensorboard = opts.tensorboard
    if opts.tensorboard and (missing := live_log.tensorboard_missing()):
        raise click.ClickException(missing)
    if opts.fp16 and opts.bf16:
        raise click.ClickException('--fp16 and --bf16 are mutually exclusive')
    batch_gpu = opts.batch_gpu or opts.batch // world_size
    if opts.batch % world_size != 0 or (opts.batch // world_size) % min(batch_gpu, opts.batch // world_size) != 0:
        raise click.ClickException(
            f'--batch={opts.batch} must be divisible by {world_size} ranks × --batch-gpu={batch_gpu}'
        )

    # Transfer learning, resume and the run directory (None: a new numbered run in --outdir, created at launch).
    if opts.transfer is not None and opts.resume is not None:
        raise click.ClickException('--transfer and --resume cannot be specified at the same time')
    if opts.allow_changes and opts.resume in (None, 'auto'):
        raise click.ClickException('--allow-changes applies to --resume=STATE|DIR only')
    if opts.transfer is not None:
        try:
            checkpoint.load_network(opts.transfer)
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--transfer: {str(e).splitlines()[0]}') from None
        c.update(transfer=opts.transfer, ema_rampup_ratio=None)
    c.seed = opts.seed
    c.run_dir = opts.outdir if opts.nosubdir else None
    net_kwargs = dict(c.network_kwargs, img_resolution=c.dataset_kwargs.resolution, img_channels=data.channels,
                      label_dim=data.label_dim)  # fmt: skip
    try:
        if opts.resume == 'auto':
            runs = run_dir.newest_of(opts.outdir, run_description(opts, None))
            resume.find_run(c, c.run_dir or runs, opts.seed, options.CONFIG_FLAGS)
        elif opts.resume is not None:
            c.resume_state = os.path.abspath(resume.find_state(opts.resume))
        if c.get('resume_state') is not None:
            resume.check_state(c, net_kwargs, not opts.allow_changes, options.CONFIG_FLAGS)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    # A run directory holds one run: --nosubdir into one continues it in place or is refused.
    in_place = opts.resume == 'auto' or os.path.dirname(c.get('resume_state') or '') == os.path.abspath(opts.outdir)
    if opts.nosubdir and run_dir.holds_run(opts.outdir) and not (in_place or opts.dry_run):
        raise click.ClickException(f'--nosubdir: {opts.outdir} already holds a run; use another --outdir, or --resume')
    return c


def precision(opts: dnnlib.EasyDict) -> str:
    """The network's arithmetic: 'fp16' (EDM's --fp16), 'bf16' (autocast) or 'fp32'."""
    return 'fp16' if opts.fp16 else 'bf16' if opts.bf16 else 'fp32'


def run_description(opts: dnnlib.EasyDict, world_size: int | None) -> str:
    """The run directory's name after its id: dataset, conditioning, architecture, preconditioning, noise sampler,
    ranks ('gpus*' for any number when None), ..."""
    cond = 'cond' if opts.cond else 'uncond'
    sampler = options.PRECOND_SAMPLER[opts.precond] if opts.sampler == 'auto' else opts.sampler
    data, gpus = os.path.splitext(os.path.basename(opts.data.rstrip('/')))[0], world_size or '*'
    desc = f'{data}-{cond}-{opts.arch}-{opts.precond}-{sampler}-gpus{gpus}-batch{opts.batch}-{precision(opts)}'
    return desc if opts.desc is None else f'{desc}-{opts.desc}'


def phema_summary(c: dnnlib.EasyDict) -> str:
    """What --ema-profiles tracks and how often it stores it, for the options summary."""
    if not c.get('ema_profiles'):
        return 'no'
    every = 'snapshot' if c.ema_profile_every is None else f'{c.ema_profile_every} kimg'
    return f'σ_rel {", ".join(f"{s:g}" for s in c.ema_profiles)}, stored every {every}'


def print_options(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, device: torch.device, threads: str) -> None:
    """The resolved config and a summary of what this run will do."""
    settings = ', '.join(f'{k}={v}' for k, v in c.noise_kwargs.items() if k != 'class_name')
    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    for name, value in [
        ('Output directory', c.run_dir),
        ('Dataset path', c.dataset_kwargs.path),
        ('Class-conditional', c.dataset_kwargs.use_labels),
        ('Network architecture', opts.arch),
        ('Preconditioning & loss', f'{opts.precond} (weight {c.loss_kwargs.weight})'),
        ('Noise sampler', c.noise_kwargs.class_name + (f' ({settings})' if settings else '')),
        ('Device', f'{device} x {dist.get_world_size()}'),
        ('CPU threads', threads),
        ('Duration', f'{c.total_kimg} kimg'),
        ('Batch size', c.batch_size),
        ('Learning rate', f'{c.optimizer_kwargs.lr:g} (ramp-up {c.lr_rampup_kimg:g} kimg)'),
        ('EMA half-life', f'{c.ema_halflife_kimg:g} kimg'),
        ('Post-hoc EMA', phema_summary(c)),
        ('Precision', precision(opts)),
        ('Resume', c.get('resume_state') or 'no'),
    ]:
        dist.print0(f'{name + ":":<25s}{value}')
    dist.print0()


def prepare_run_dir(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, desc: str, locks: list[int]) -> bool:
    """Rank 0: claim the run directory (resume.claim) and write training_options.json; a run continued in place keeps
    its log.txt and its stats.jsonl up to the resumed state. Says whether the run is new."""
    try:
        auto = run_description(opts, None) if opts.resume == 'auto' else None
        new_run = resume.claim(c, opts.outdir, desc, auto, options.CONFIG_FLAGS, locks)
    except (ValueError, run_dir.Busy) as e:
        raise click.ClickException(str(e)) from None
    if not new_run:
        for name in dnnlib.util.remove_stale_temp_files(c.run_dir, own_pid_is_stale=True):
            dist.print0(f'Removed "{name}", left by a stopped process')
        in_place = os.path.dirname(c.get('resume_state') or '') == os.path.abspath(c.run_dir)
        run_dir.trim_stats(c.run_dir, run_dir.state_nimg(c.resume_state) if in_place else -1)
    try:
        with dnnlib.util.atomic_write(os.path.join(c.run_dir, run_dir.OPTIONS), 'w') as f:
            json.dump(c, f, indent=2)
    except OSError:
        if new_run:  # Leave no run directory without its options behind.
            shutil.rmtree(c.run_dir, ignore_errors=True)
        raise
    return new_run


def launch_training(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, desc: str, device: torch.device, threads: str) -> None:
    """Prepare the run directory on rank 0 (every rank learns it, or the error that stopped it), log to log.txt and
    run the training loop until done or stopped by SIGTERM/SIGINT: then with a training state saved, and exit status
    128 + the signal."""
    locks, logger, error = [], None, None
    try:
        if dist.get_rank() == 0:
            try:
                with cli.disk_errors(f'into {opts.outdir}'):
                    new_run = prepare_run_dir(c, opts, desc, locks)
                print_options(c, opts, device, threads)
                dist.print0('Creating output directory...' if new_run else f'Continuing {c.run_dir} in place...')
                logger = dnnlib.util.Logger(os.path.join(c.run_dir, run_dir.LOG), file_mode='a', should_flush=True)
            except click.ClickException as e:
                error = e.message
        c.run_dir, error = dist.broadcast_object((c.run_dir, error))
        if error is not None:
            raise click.ClickException(error) if dist.get_rank() == 0 else SystemExit(1)
        with dist.StopSignals() as stop_signals, cli.disk_errors(f'into {c.run_dir}'):
            result = training_loop.training_loop(**c, device=device, stop_signals=stop_signals)
    except CorruptImageError as e:  # A DataLoader worker's error comes with its traceback: keep the message.
        raise click.ClickException(str(e).strip().splitlines()[-1].split('CorruptImageError: ')[-1]) from None
    finally:
        if logger is not None:
            logger.close()
        for fd in locks:
            os.close(fd)  # Releases the lock.
        dist.shutdown()
    if result.stopped:
        sys.exit(128 + result.stopped)


# fmt: off
@click.command()
# Main options.
@click.option('--outdir',     help='Where to save the results', metavar='DIR',                       type=str, required=True)
@click.option('--data',       help='Path to the dataset', metavar='ZIP|DIR|NPZ',                         type=str, required=True)
@click.option('--preset',     help='Fill unset options from configs/NAME.json or a JSON FILE', metavar='NAME|FILE', type=str)
@click.option('--cond',       help='Train class-conditional model', metavar='BOOL',                  type=bool, default=False, show_default=True)
@click.option('--arch',       help='Network architecture',                                           type=click.Choice(['ddpmpp', 'ncsnpp', 'adm', 'ddpmpp1d']), default='ddpmpp', show_default=True)
@click.option('--precond',    help='Preconditioning & loss function',                                type=click.Choice(['vp', 've', 'edm']), default='edm', show_default=True)
@click.option('--sampler',    help="Training noise sampler (auto = the precond's own; kingma-gao reads the --info-* options it shares)", type=click.Choice(options.SAMPLERS), default='auto', show_default=True)
@click.option('--weight',     help="Loss weight (auto = the precond's own; learned = auto with EDM2's learned uncertainty)", type=click.Choice(['auto', 'edm', 'inverse-variance', 'uniform', 'min-snr', 'learned']), default='auto', show_default=True)
@click.option('--curriculum-switch', help='Curriculum: switch to uniform t after this share of --duration', metavar='FLOAT', type=cli.FloatRange(min=0, max=1), default=0.5, show_default=True)

# InfoNoise (--sampler=infonoise); docs/infonoise.md ("Defaults") says how the defaults were chosen.
@click.option('--info-bins',     help='InfoNoise: log-spaced intervals K', metavar='INT',                type=click.IntRange(min=2), default=64, show_default=True)
@click.option('--info-buffer',   help='InfoNoise: FIFO capacity B per interval', metavar='INT',          type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--info-beta',     help='InfoNoise: EMA rate of the per-interval loss', metavar='FLOAT',   type=cli.FloatRange(min=0, max=1, min_open=True), default=0.25, show_default=True)
@click.option('--info-refresh',  help='InfoNoise: refresh period M', metavar='KIMG',                     type=cli.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--info-warmup',   help='InfoNoise: warm-up N_warm under the base noise sampler', metavar='KIMG', type=cli.FloatRange(min=0), default=1000, show_default=True)
@click.option('--info-nmin',     help='InfoNoise: losses N_min per interval before a refresh', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--info-gate-n',   help='InfoNoise: gate exponent n', metavar='FLOAT',                     type=cli.FloatRange(min=0, min_open=True), default=3, show_default=True)
@click.option('--info-p',        help='InfoNoise: onset threshold p', metavar='FLOAT',                   type=cli.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.002, show_default=True)
@click.option('--info-smooth',   help='InfoNoise: peak-preserving smoothing width, 0 = off', metavar='BINS', type=cli.FloatRange(min=0), default=1, show_default=True)
@click.option('--info-endpoint', help='InfoNoise: endpoint type (auto = detect from the data)',          type=click.Choice(['auto', 'continuous', 'discrete']), default='auto', show_default=True)
@click.option('--info-pivot',    help='InfoNoise: fixed pivot c  [default: calibrated]', metavar='FLOAT', type=cli.FloatRange(min=0, min_open=True))
@click.option('--info-base',     help='InfoNoise: base noise sampler for the warm-up',                         type=click.Choice(['lognormal', 'loguniform']), default='lognormal', show_default=True)
@click.option('--info-floor',    help='InfoNoise: log-uniform floor, share of the draws', metavar='FLOAT', type=cli.FloatRange(min=0, max=1), default=0.05, show_default=True)
@click.option('--info-build',    help='InfoNoise: law of σ (paper = Alg. 1 as written)',                       type=click.Choice(['continuous', 'paper']), default='continuous', show_default=True)
@click.option('--info-sigma-min', help="InfoNoise: lowest σ  [default: the precond's]", metavar='FLOAT', type=cli.FloatRange(min=0, max=1e6, min_open=True))
@click.option('--info-sigma-max', help="InfoNoise: highest σ  [default: the precond's]", metavar='FLOAT', type=cli.FloatRange(min=0, max=1e6, min_open=True))

# Hyperparameters.
@click.option('--duration',   help='Training duration', metavar='MIMG',                              type=cli.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',      help='Total batch size', metavar='INT',                                type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu',  help='Limit batch size per GPU', metavar='INT',                        type=click.IntRange(min=1))
@click.option('--cbase',      help='Channel multiplier  [default: varies]', metavar='INT',           type=click.IntRange(min=1))
@click.option('--cres',       help='Channels per resolution  [default: varies]', metavar='LIST',     type=dnnlib.util.parse_int_list)
@click.option('--blocks',     help='Residual blocks per resolution  [default: varies]', metavar='INT', type=click.IntRange(min=1, max=64))
@click.option('--attn',       help='Resolutions with self-attention, none = no attention  [default: varies]', metavar='LIST|none', type=attn_list)
@click.option('--lr',         help='Learning rate', metavar='FLOAT',                                 type=cli.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option('--lr-rampup',  help='Learning rate ramp-up', metavar='KIMG',                          type=cli.FloatRange(min=0), default=10000, show_default=True)
@click.option('--ema',        help='EMA half-life', metavar='MIMG',                                  type=cli.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--ema-profiles', help="Post-hoc EMA: track power-function EMA profiles of these σ_rel (EDM2)  [default: none]", metavar='LIST', type=phema.parse_sigma_rels)
@click.option('--ema-profile-every', help='Post-hoc EMA: store the profiles this often  [default: with each snapshot]', metavar='KIMG', type=click.IntRange(min=1))
@click.option('--dropout',    help='Dropout probability', metavar='FLOAT',                           type=cli.FloatRange(min=0, max=1), default=0.13, show_default=True)
@click.option('--label-dropout', help='Probability of training on the null label, for classifier-free guidance', metavar='FLOAT', type=cli.FloatRange(min=0, max=1), default=0, show_default=True)
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
@click.option('--snap-grid',  help='Sample grid of the first N seeds with each snapshot, 0 = off', metavar='N', type=click.IntRange(min=0, max=1024), default=0, show_default=True)
@click.option('--snap-grid-scale', help='Enlarge each image of the sample grid by this factor', metavar='INT', type=click.IntRange(min=1, max=16), default=1, show_default=True)
@click.option('--verbose',    help='Print every InfoNoise refresh check (stats.jsonl holds them all)', is_flag=True)
@click.option('--tensorboard', help='Also log each tick to TensorBoard in the run directory (pip install tensorboard)', is_flag=True)
@click.option('--seed',       help="Random seed  [default: random, or the resumed run's]", metavar='INT', type=int)
@click.option('--transfer',   help='Transfer learning from network snapshot or EDM pickle', metavar='PT|PKL|URL', type=str)
@click.option('--resume',     help="Resume from a training state (ours or EDM's) or run directory; auto = continue this command's newest run in place", metavar='PT|DIR|auto', type=str)
@click.option('--allow-changes', help='With --resume=STATE|DIR: continue although data, loss or noise sampler differ', is_flag=True)
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

    \b
    On preemptible machines, run the same command with --resume=auto: each launch continues the newest run of
    that command in OUTDIR in place from its newest training state (or starts one).
    """
    opts, given = options_of(click.get_current_context())
    torch.multiprocessing.set_start_method('spawn', force=True)
    if not opts.dry_run:
        cli.check_output_dir(opts.outdir, '--outdir')
    try:
        device = dist.init(opts.device)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    threads = misc.set_cpu_threads()
    c = setup_training_config(opts, given, dist.get_world_size(), device)
    if c.seed is None:
        c.seed = dist.broadcast_object(secrets.randbelow(1 << 31))
    desc = run_description(opts, dist.get_world_size())

    # Nothing to do for a state at or past the duration: a finished run relaunched stays as it is.
    if c.get('resume_state') is not None and (nimg := run_dir.state_nimg(c.resume_state)) >= c.total_kimg * 1000:
        where = c.run_dir if opts.resume == 'auto' else c.resume_state
        dist.print0(f'{where} is already complete: {nimg / 1e3:g} kimg of --duration={opts.duration:g} Mimg done.')
        dist.shutdown()
        return

    # Dry run? It also shows what the training loop would say first about the noise sampler.
    if opts.dry_run:
        c.run_dir = c.run_dir or run_dir.next_id_dir(opts.outdir, desc)
        print_options(c, opts, device, threads)
        sampler = dnnlib.util.construct_class_by_name(**c.noise_kwargs)
        for line in sampler.schedule_report(c.total_kimg * 1000, c.batch_size):
            dist.print0(line)
        dist.print0('Dry run; exiting.')
        dist.shutdown()
        return
    launch_training(c, opts, desc, device, threads)


if __name__ == '__main__':
    main()
