"""Guidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): the guided denoiser
D_w = D_guide + w (D_main - D_guide) in the solvers and in generate.py (autoguidance and classifier-free guidance),
and the label dropout of train.py that classifier-free guidance needs."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_NET_ARGS, train_config
from test_training import tiny_config

import generate
import train
from infonoise.grids import edm_grid
from training import training_loop as tl
from training.checkpoint import load_network
from training.networks import EDMPrecond
from training.sampling import GuidedDenoiser, edm_sampler, generate_images, guided_denoiser


def tiny_snapshot(path, resolution=8, channels=1, label_dim=0, seed=0, **extra):
    """A tiny EDMPrecond snapshot in our format, its weights drawn from `seed` (all of them random)."""
    network_kwargs = dict(class_name='training.networks.EDMPrecond', img_resolution=resolution, img_channels=channels,
                          label_dim=label_dim, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
                          num_blocks=1, attn_resolutions=[], **extra)  # fmt: skip
    torch.manual_seed(seed)
    net = EDMPrecond(**{k: v for k, v in network_kwargs.items() if k != 'class_name'})
    with torch.no_grad():  # EDM zero-initialises the output layer: perturb, so that networks and labels matter.
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    torch.save(dict(format='infonoise-edm-snapshot', version=1, network_kwargs=network_kwargs, ema=net.state_dict(),
                    loss_kwargs={}, noise_kwargs={}, augment_kwargs=None, dataset_kwargs={}, kimg=0, profile=None),
               path)  # fmt: skip
    return str(path)


class LinearDenoiser:
    """Stub network of N(0, lam I) data: D(x; σ) = x lam / (lam + σ²); records the labels of every call."""

    sigma_min, sigma_max, img_shape = 0, float('inf'), [1, 4, 4]

    def __init__(self, lam: float, label_dim: int = 0):
        self.lam, self.label_dim, self.labels = lam, label_dim, []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.labels.append(None if class_labels is None else class_labels.clone())
        return x * self.lam / (self.lam + sigma**2)


class NeverCalled(LinearDenoiser):
    def __call__(self, x, sigma, class_labels=None):
        raise AssertionError('The guide was called')


def invoke(main, *args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------------------------------
# The guided denoiser in the solvers.


def test_guidance_one_is_the_unguided_sampler_bit_for_bit(tmp_path):
    net = load_network(tiny_snapshot(tmp_path / 'net.pt', label_dim=3)).net
    sigmas, churn = edm_grid(5), dict(S_churn=10, S_noise=1.003)  # Stochastic: the noise draws count too.

    def images(**kwargs):
        batches = generate_images(net, [0, 1, 2, 3], sigmas, torch.device('cpu'), 2, progress=False, **churn, **kwargs)
        return torch.cat([images for _, images, _ in batches])

    unguided = images()
    assert guided_denoiser(net, 1, NeverCalled(0.25)) is net  # Short-circuit: the guide is not even wrapped.
    assert torch.equal(images(guidance=1, guide=NeverCalled(0.25)), unguided)
    assert torch.equal(images(guidance=1.0), unguided)
    # The same random draws whatever w: a guide equal to the network gives the unguided samples at any w.
    assert torch.equal(images(guidance=2.5, guide=net), unguided)
    assert not torch.equal(images(guidance=2.5), unguided)  # Classifier-free guidance does change them.


@pytest.mark.parametrize('w', [0, 0.5, 1.5, 3])
def test_gaussian_guided_ode_has_the_closed_form_variance(w):
    """Main network: exact denoiser of N(0, a²) data, D_a = x a²/(a²+σ²); guide: that of N(0, b²). The guided
    denoiser is linear, D_w = k(σ) x with k = w a²/(a²+σ²) + (1-w) b²/(b²+σ²), so the probability-flow ODE
    dx/dσ = (x - D_w)/σ = x [w σ/(a²+σ²) + (1-w) σ/(b²+σ²)] integrates from σ_max down to σ_min to
    x(σ_min) = x(σ_max) ((a²+σ_min²)/(a²+σ_max²))^(w/2) ((b²+σ_min²)/(b²+σ_max²))^((1-w)/2).
    The solver starts at x(σ_max) = σ_max z (z unit normal) and its last step (Euler to σ = 0) returns
    D_w(x; σ_min) = k(σ_min) x(σ_min). The output is c z with
    c = σ_max k(σ_min) ((a²+σ_min²)/(a²+σ_max²))^(w/2) ((b²+σ_min²)/(b²+σ_max²))^((1-w)/2),
    so its variance is c² (→ a^(2w) b^(2(1-w)) as σ_min → 0, σ_max → ∞: guidance sharpens when b > a).
    Tolerance: what remains is Heun's global error, O(h²): on EDM's grid the relative error measured here is
    ~1.5e-3 (w = 0) to ~4e-3 (w = 3) at 128 steps and 4 times smaller at 256. So the test asks for < 2e-3 at 256
    steps and for second-order convergence (the error shrinks by 3.6-4.4 when the steps double), which a wrong
    coefficient or a wrong w would not give; variances for neighbouring w differ by tens of percent.
    """
    a, b, sigma_min, sigma_max = 0.5, 0.8, 0.002, 80.0
    k_min = w * a**2 / (a**2 + sigma_min**2) + (1 - w) * b**2 / (b**2 + sigma_min**2)
    flow = ((a**2 + sigma_min**2) / (a**2 + sigma_max**2)) ** (w / 2)
    flow *= ((b**2 + sigma_min**2) / (b**2 + sigma_max**2)) ** ((1 - w) / 2)
    expected_variance = (sigma_max * k_min * flow) ** 2

    latents = torch.randn([64, 1, 4, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for num_steps in (128, 256):
        denoiser = guided_denoiser(LinearDenoiser(a**2), w, LinearDenoiser(b**2))
        out = edm_sampler(denoiser, latents, edm_grid(num_steps, sigma_min, sigma_max))
        errors.append(abs((out.var() / latents.var()).item() / expected_variance - 1))
    assert errors[1] < 2e-3 and 3.6 < errors[0] / errors[1] < 4.4, errors
    assert expected_variance == pytest.approx(a ** (2 * w) * b ** (2 * (1 - w)), rel=1e-3)


def test_classifier_free_guidance_gives_the_guide_the_zero_label():
    net = LinearDenoiser(0.25, label_dim=3)
    denoiser = guided_denoiser(net, 2.0)
    assert isinstance(denoiser, GuidedDenoiser) and denoiser.guide is net and denoiser.label_dim == 3
    labels = torch.eye(3)[[0, 2]]
    x, sigma = torch.randn([2, 1, 4, 4], dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    assert torch.equal(denoiser(x, sigma, labels), net(x, sigma, labels))  # The stub ignores labels.
    calls = net.labels[:2]  # The main call with the labels, then the guide's with zeros of the same shape.
    assert torch.equal(calls[0], labels) and torch.equal(calls[1], torch.zeros(2, 3))
    with pytest.raises(ValueError, match='needs a class-conditional network'):
        guided_denoiser(LinearDenoiser(0.25), 2.0)


# ----------------------------------------------------------------------------------------------------------------------
# generate.py.


def test_generate_guidance_options(tmp_path):
    main_pt = tiny_snapshot(tmp_path / 'main.pt', label_dim=3, label_dropout=0.1)
    early_pt = tiny_snapshot(tmp_path / 'early.pt', label_dim=3, seed=1)
    common = ['--network', main_pt, '--seeds', '0-3', '--steps', 4, '--device', 'cpu', '--class', 1]

    def run(name, *args):
        result = invoke(generate.main, *common, '--outdir', tmp_path / name, *args)
        assert result.exit_code == 0, result.output
        pngs = [(tmp_path / name / f'{seed:06d}.png').read_bytes() for seed in range(4)]
        return pngs, json.loads((tmp_path / name / 'grid.json').read_text()), result.output

    plain, record, _ = run('plain')
    assert record['guidance'] == 1 and 'guide' not in record
    assert run('one', '--guidance=1')[0] == plain
    assert run('self', '--guidance=2', '--guide-network', main_pt)[0] == plain  # Guide = network: no change.
    auto, record, _ = run('auto', '--guidance=2', '--guide-network', early_pt)
    assert auto != plain and record['guidance'] == 2 and record['guide'] == early_pt
    cfg, record, output = run('cfg', '--guidance=2')
    assert cfg not in (plain, auto) and record['guide'].startswith('null label') and 'Warning' not in output
    # A conditional network trained without label dropout: classifier-free guidance runs, with a warning.
    output = run('cfg-early', '--network', early_pt, '--guidance=2')[2]
    assert 'Warning: classifier-free guidance, but the network was trained without label dropout' in output


def test_generate_guidance_errors_are_one_line(tmp_path):
    cond = tiny_snapshot(tmp_path / 'cond.pt', label_dim=3)
    uncond = tiny_snapshot(tmp_path / 'uncond.pt')
    cases = [
        (cond, ['--guide-network', uncond], '--guide-network has no effect with --guidance=1'),
        (uncond, ['--guidance=2'], 'is classifier-free guidance, which needs a class-conditional network'),
        (cond, ['--guidance=2', '--guide-network', uncond], '--guide-network has label_dim 0, the network 3'),
        (uncond, ['--guidance=2', '--guide-network', tiny_snapshot(tmp_path / 'r16.pt', resolution=16)],
         '--guide-network has resolution 16, the network 8'),
        (uncond, ['--guidance=2', '--guide-network', tiny_snapshot(tmp_path / 'rgb.pt', channels=3)],
         '--guide-network has channels 3, the network 1'),
        (uncond, ['--guidance=2', '--guide-network', tmp_path / 'missing.pt'], '--guide-network: '),
        (uncond, ['--guidance=nan'], "Invalid value for '--guidance'"),
    ]  # fmt: skip
    for network, args, message in cases:
        result = invoke(generate.main, '--network', network, '--outdir', tmp_path / 'out', '--device', 'cpu', *args)
        errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
        assert result.exit_code != 0 and len(errors) == 1 and message in errors[0], (args, result.output)
        assert not (tmp_path / 'out' / '000000.png').exists()


# ----------------------------------------------------------------------------------------------------------------------
# Label dropout in training.


def test_label_dropout_option(tmp_path, digits_zip):
    base = ['--outdir', tmp_path, '--data', digits_zip, *TINY_NET_ARGS]
    today = train_config(*base, '--cond=1')
    assert 'label_dropout' not in today['network_kwargs']
    assert train_config(*base, '--cond=1', '--label-dropout=0') == today  # p = 0: EDM's config, key for key.
    assert train_config(*base, '--cond=1', '--label-dropout=0.1')['network_kwargs']['label_dropout'] == 0.1
    result = invoke(train.main, *base, '--label-dropout=0.1', '--dry-run')
    assert result.exit_code != 0 and 'Error: --label-dropout drops class labels; it needs --cond=1' in result.output


def record_label_inputs(label_dim: int):
    """A global forward pre-hook that records the input of every label-embedding layer (a Linear with `label_dim`
    inputs) in a training step (training mode, gradients on; not the loop's module summary): the labels the network
    sees, after its label dropout."""
    seen = []

    def hook(module, args):
        is_label_layer = module.__class__.__name__ == 'Linear' and getattr(module, 'in_features', None) == label_dim
        if is_label_layer and module.training and torch.is_grad_enabled():
            seen.append(args[0].detach().clone())

    return seen, torch.nn.modules.module.register_module_forward_pre_hook(hook)


def train_and_record(run_dir, digits_zip, label_dropout=None, **overrides):
    config = tiny_config(digits_zip, run_dir, total_kimg=0.016, **overrides)
    if label_dropout is not None:
        config['network_kwargs'] = dict(config['network_kwargs'], label_dropout=label_dropout)
    seen, handle = record_label_inputs(10)
    try:
        result = tl.training_loop(**config)
    finally:
        handle.remove()
    return result, torch.cat(seen)


def test_label_dropout_in_training(tmp_path, digits_zip):
    today, labels_today = train_and_record(tmp_path / 'a', digits_zip)
    zero, labels_zero = train_and_record(tmp_path / 'b', digits_zip, label_dropout=0)
    assert labels_today.shape == (16, 10) and (labels_today != 0).any(dim=1).all()  # Every sample has its class.
    for pa, pb in zip(today.net.state_dict().values(), zero.net.state_dict().values()):
        assert torch.equal(pa, pb)  # p = 0 is today's run bit for bit.
    _, labels_all = train_and_record(tmp_path / 'c', digits_zip, label_dropout=1)
    assert labels_all.shape == (16, 10) and (labels_all == 0).all()  # p = 1: only the null label.

    # 0 < p < 1: a share of about p (a training-mode forward pass of 4,000 labelled samples; 5 binomial std).
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, model_type='SongUNet', model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], label_dropout=0.3).train()  # fmt: skip
    seen, handle = record_label_inputs(10)
    try:
        net(torch.zeros([4000, 1, 8, 8]), torch.ones([4000]), torch.eye(10)[torch.arange(4000) % 10])
    finally:
        handle.remove()
    share = (seen[0] == 0).all(dim=1).double().mean().item()
    assert share == pytest.approx(0.3, abs=5 * math.sqrt(0.3 * 0.7 / 4000))


def test_label_dropout_resumes_exactly(tmp_path, digits_zip):
    network_kwargs = dict(tiny_config(digits_zip, tmp_path / 'x')['network_kwargs'], label_dropout=0.5)
    straight = tl.training_loop(**tiny_config(digits_zip, tmp_path / 'a', network_kwargs=network_kwargs))
    tl.training_loop(**tiny_config(digits_zip, tmp_path / 'b', total_kimg=0.016, network_kwargs=network_kwargs))
    state = str(tmp_path / 'b' / 'training-state-000000.pt')
    resumed = tl.training_loop(
        **tiny_config(digits_zip, tmp_path / 'c', resume_state=state, network_kwargs=network_kwargs)
    )
    for pa, pb in zip(straight.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(pa, pb)
    # Control: the dropout draws do change the run.
    plain = tl.training_loop(**tiny_config(digits_zip, tmp_path / 'd'))
    assert not all(torch.equal(p, q) for p, q in zip(straight.net.parameters(), plain.net.parameters()))
