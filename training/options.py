"""What train.py's options mean: EDM's architecture presets, each preconditioning's own noise sampler, loss weight and
σ range (EDM Table 1), InfoNoise's options, the option behind each config key (for messages that name what differs),
and the check that the network the options describe can be built and fits the device (on the meta device, before
anything is written). Refusals are ValueErrors of one line that name the options.
"""

import psutil
import torch

import dnnlib
from infonoise.grids import VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T
from infonoise.samplers import VPSampler

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
    # Not EDM's: the 1-D DDPM++ analogue for DNA sequences (training/networks_1d.py, SequenceUNet).
    'ddpmpp1d': dict(model_type='SequenceUNet', model_channels=128, channel_mult=[1, 2, 2], num_blocks=2),
}
SEQUENCE_ARCHS = ('ddpmpp1d',)
PRECOND_CLASS = {'vp': 'VPPrecond', 've': 'VEPrecond', 'edm': 'EDMPrecond'}

# Each preconditioning's own training distribution and loss weight (EDM Table 1), used for 'auto'.
PRECOND_SAMPLER = {'edm': 'lognormal', 'vp': 'vp', 've': 'loguniform'}
PRECOND_WEIGHT = {'edm': 'edm', 'vp': 'inverse-variance', 've': 'inverse-variance'}
# EDM's σ ranges: the EDM sampling range, VEPrecond's, and VP's σ(ε_t)..σ(1) (VPSampler's icdf at u = 1 and 0).
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
    # The published rivals (infonoise/samplers.py; docs/library.md, "Rival schedules"), the same for every precond.
    'sd3': lambda precond: dict(class_name='infonoise.rivals.LogitNormal', m=0.0, s=1.0),
    'jit': lambda precond: dict(class_name='infonoise.rivals.LogitNormal', m=0.8, s=0.8),
    'laplace': lambda precond: dict(class_name='infonoise.rivals.LaplaceLogSNR', mu=0.0, b=0.5),
    'uniform-t': lambda precond: dict(class_name='infonoise.rivals.UniformT', t_min=1e-3, t_max=1 - 1e-3),
    # train.py adds switch_kimg = --curriculum-switch × --duration.
    'curriculum': lambda precond: dict(class_name='infonoise.rivals.Curriculum', first='sd3', second='uniform-t'),
}
SAMPLERS = ('auto', *SAMPLER_KWARGS, 'kingma-gao', 'infonoise')


# InfoNoise's constructor arguments and the --info-* options that set them.
INFO_OPTIONS = dict(
    num_bins='info_bins', buffer_size='info_buffer', ema_rate='info_beta', refresh_kimg='info_refresh',
    warmup_kimg='info_warmup', min_count='info_nmin', gate_n='info_gate_n', onset_p='info_p', smoothing='info_smooth',
    endpoint='info_endpoint', pivot='info_pivot', base='info_base', floor='info_floor', build='info_build',
    sigma_min='info_sigma_min', sigma_max='info_sigma_max',
)  # fmt: skip


def infonoise_kwargs(opts: dnnlib.EasyDict, weight: str, discrete_data: bool) -> dnnlib.EasyDict:
    """InfoNoise's constructor arguments from the --info-* options."""
    kwargs = dnnlib.EasyDict(class_name='infonoise.InfoNoise', weight=weight, sigma_data=0.5)
    kwargs.update({name: opts[option] for name, option in INFO_OPTIONS.items()})
    sigma_min, sigma_max = PRECOND_SIGMA_RANGE[opts.precond]
    kwargs.update(sigma_min=kwargs.sigma_min or sigma_min, sigma_max=kwargs.sigma_max or sigma_max)
    if kwargs.endpoint == 'auto':
        kwargs.endpoint = 'discrete' if discrete_data else 'continuous'
    return kwargs


# Kingma-Gao's constructor arguments and the --info-* options that set them (the same meaning as InfoNoise's).
KINGMA_GAO_OPTIONS = dict(
    num_bins='info_bins', ema_rate='info_beta', refresh_kimg='info_refresh', warmup_kimg='info_warmup',
    floor='info_floor', sigma_min='info_sigma_min', sigma_max='info_sigma_max',
)  # fmt: skip

# Channels of EDM2's learned uncertainty u(σ) for --weight=learned (EDM2's logvar_channels).
UNCERTAINTY_CHANNELS = 128


def kingma_gao_kwargs(opts: dnnlib.EasyDict, weight: str, given: set[str]) -> dnnlib.EasyDict:
    """KingmaGao's constructor arguments: reference law q = the precond's own noise sampler, the loss weight, and
    the --info-* options it shares with InfoNoise; ValueError naming an --info-* option given that it does not use."""
    unused = sorted(name for name in given if name.startswith('info_') and name not in KINGMA_GAO_OPTIONS.values())
    if unused:
        raise ValueError(f'--{unused[0].replace("_", "-")} only applies to --sampler=infonoise')
    kwargs = dnnlib.EasyDict(class_name='infonoise.kingma_gao.KingmaGao', weight=weight, sigma_data=0.5)
    kwargs.update({name: opts[option] for name, option in KINGMA_GAO_OPTIONS.items()})
    sigma_min, sigma_max = PRECOND_SIGMA_RANGE[opts.precond]
    kwargs.update(sigma_min=kwargs.sigma_min or sigma_min, sigma_max=kwargs.sigma_max or sigma_max)
    kwargs.base = PRECOND_SAMPLER[opts.precond]  # 'lognormal', 'vp' or 'loguniform': EDM's law for the precond.
    return kwargs


# The option behind each entry of the config, for messages that name what differs (keys dotted or by their last part).
CONFIG_FLAGS = dict(
    path='--data', use_labels='--cond', xflip='--xflip', resolution='--data', max_size='--data', cache='--cache',
    model_type='--arch', model_channels='--cbase', channel_mult='--cres', num_blocks='--blocks',
    attn_resolutions='--attn', dropout='--dropout', label_dropout='--label-dropout', use_fp16='--fp16', augment_dim='--augment', p='--augment',
    augment_kwargs='--augment', weight='--weight', lr='--lr', total_kimg='--duration', ema_halflife_kimg='--ema',
    lr_rampup_kimg='--lr-rampup', batch_size='--batch', batch_gpu='--batch-gpu', loss_scaling='--ls', bf16='--bf16',
    compile='--compile', seed='--seed', transfer='--transfer', ema_rampup_ratio='--transfer', verbose='--verbose',
    tensorboard='--tensorboard',
    **{name: '--' + option.replace('_', '-') for name, option in INFO_OPTIONS.items()},
)  # fmt: skip
CONFIG_FLAGS.update({'network_kwargs.class_name': '--precond', 'noise_kwargs.class_name': '--sampler'})
# Settings of a fixed noise sampler that --sampler chooses (sd3 and jit differ only in them), and the curriculum's switch.
CONFIG_FLAGS.update(
    {f'noise_kwargs.{key}': '--sampler' for key in ('m', 's', 'mu', 'b', 't_min', 't_max', 'first', 'second')}
)
CONFIG_FLAGS['noise_kwargs.switch_kimg'] = '--curriculum-switch × --duration'
CONFIG_FLAGS.update(uncertainty_channels='--weight', learned_uncertainty='--weight')
CONFIG_FLAGS.update(ema_profiles='--ema-profiles', ema_profile_every='--ema-profile-every')


def check_network(c: dnnlib.EasyDict, data: dnnlib.EasyDict, opts: dnnlib.EasyDict, device: torch.device) -> None:
    """Refuse, before anything is written, a network that cannot be built or would not fit: levels the data cannot
    halve into, attention at no level, or more memory for weights, EMA, gradients and Adam than the device has."""
    kwargs = dict(c.network_kwargs, img_resolution=c.dataset_kwargs.resolution, img_channels=data.channels,
                  label_dim=data.label_dim)  # fmt: skip
    res, cres = kwargs['img_resolution'], list(kwargs['channel_mult'])
    what = 'length' if opts.arch in SEQUENCE_ARCHS else 'resolution'
    if not cres or min(cres) < 1:
        raise ValueError(f'--cres={",".join(map(str, cres))}: channel multipliers must be positive')
    if res % 2 ** (len(cres) - 1) != 0:
        most = 1 + next(i for i in range(len(cres)) if res % 2 ** (i + 1) != 0)
        raise ValueError(
            f'--cres={",".join(map(str, cres))}: {len(cres)} levels halve the {what} {res} {len(cres) - 1} times, '
            f'which it does not allow; give at most {most} multipliers'
        )
    levels = [res >> i for i in range(len(cres))]
    if opts.attn is not None and (unmatched := sorted(set(opts.attn) - set(levels))):
        raise ValueError(
            f'--attn={",".join(map(str, opts.attn))}: no level of this network has {what} '
            f'{",".join(map(str, unmatched))} (its levels: {",".join(map(str, levels))}); choose among them, '
            'or --attn=none for no attention'
        )
    try:
        with torch.device('meta'):
            params = sum(p.numel() for p in dnnlib.util.construct_class_by_name(**kwargs).parameters())
    except Exception as e:
        raise ValueError(f'Cannot build the network from these options: {e}'.splitlines()[0]) from None
    # Weights, EMA, gradients and Adam's two moments: five float32 copies, and one per post-hoc EMA profile.
    need, have = params * 4 * (5 + len(opts.get('ema_profiles') or [])), device_memory(device)
    if need > have:
        raise ValueError(
            f'The network has {params:,} parameters: {need / 2**30:.1f} GiB for weights, EMA, gradients and Adam, '
            f'more than the {have / 2**30:.1f} GiB of {device}; lower --cbase, --cres or --blocks'
        )


def device_memory(device: torch.device) -> int:
    """Bytes of memory on `device`: the GPU's, or the machine's RAM."""
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total
