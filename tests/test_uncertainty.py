"""EDM2's learned uncertainty (infonoise.uncertainty): u = 0 at the start, gradients reach u, networks without it keep
EDM's state-dict layout, the objective's minimiser is e^u = w·mse, and a tiny run with it (and with KingmaGao's
importance weights) trains, saves and resumes bit-exactly."""

import pytest
import torch
from conftest import TINY_NET_ARGS, invoke, train_config
from test_training import tiny_config

import train
from infonoise.uncertainty import LearnedUncertainty, uncertainty_objective
from training import training_loop as tl
from training.loss import DenoisingLoss
from training.networks import EDMPrecond, VEPrecond, VPPrecond

TINY = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


def test_zero_at_start_and_deterministic():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = LearnedUncertainty()
    assert torch.equal(torch.get_rng_state(), state)  # The global RNG is untouched.
    b = LearnedUncertainty()
    assert torch.equal(a.freqs, b.freqs) and torch.equal(a.phases, b.phases) and a.freqs.numel() == 128
    sigma = torch.logspace(-2, 1.5, 9)
    assert torch.equal(a(sigma), torch.zeros(9))
    weighted = torch.rand(9)
    assert torch.equal(a.objective(weighted, sigma), weighted)
    # Fourier features of c_noise = ln σ / 4: √2·cos(2π(f·c + φ)).
    c = sigma.log() / 4
    expected = 2**0.5 * torch.cos(2 * torch.pi * (c[:, None] * a.freqs + a.phases))
    torch.testing.assert_close(a.features(sigma), expected)


def test_gradient_reaches_u():
    module = LearnedUncertainty(16)
    sigma = torch.logspace(-2, 1, 8)
    module.objective(torch.rand(8) + 0.5, sigma).sum().backward()
    assert module.weight.grad.abs().sum() > 0 and module.bias.grad.abs().sum() > 0


@pytest.mark.parametrize('precond', [EDMPrecond, VEPrecond, VPPrecond])
def test_network_layout_unchanged_when_off(precond):
    torch.manual_seed(1)
    plain = precond(img_resolution=8, img_channels=1, **TINY)
    torch.manual_seed(1)
    off = precond(img_resolution=8, img_channels=1, uncertainty_channels=0, **TINY)
    torch.manual_seed(1)
    on = precond(img_resolution=8, img_channels=1, uncertainty_channels=128, **TINY).eval()
    names = list(plain.state_dict())
    assert list(off.state_dict()) == names
    extra = [name for name in on.state_dict() if name not in names]
    assert extra == ['uncertainty.weight', 'uncertainty.bias', 'uncertainty.freqs', 'uncertainty.phases']
    for name in names:  # The same weights: building u draws nothing from the global RNG.
        assert torch.equal(plain.state_dict()[name], on.state_dict()[name]), name
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        D, u = on(x, sigma, return_logvar=True)
        assert torch.equal(D, on(x, sigma)) and torch.equal(u, torch.zeros(3))
        with pytest.raises(ValueError, match='uncertainty_channels'):
            plain(x, sigma, return_logvar=True)


def test_loss_with_learned_uncertainty():
    torch.manual_seed(2)
    net = EDMPrecond(img_resolution=8, img_channels=1, uncertainty_channels=128, **TINY).eval()
    images, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.05, 0.5, 2.0, 20.0])
    results = []
    for learned in (False, True):
        torch.manual_seed(3)
        results.append(DenoisingLoss('edm', learned_uncertainty=learned)(net, images, sigma))
    (plain, mse_plain), (learned, mse) = results
    assert torch.equal(mse, mse_plain) and torch.equal(learned, plain)  # u = 0 at the start.
    with torch.no_grad():
        net.uncertainty.bias.fill_(0.7)
    torch.manual_seed(3)
    loss, mse = DenoisingLoss('edm', learned_uncertainty=True)(net, images, sigma)
    torch.testing.assert_close(loss, plain / torch.exp(torch.tensor(0.7)) + 0.7)
    assert torch.equal(mse, mse_plain)  # The raw mse, for `observe`.


def test_minimiser_is_the_weighted_loss():
    # Pointwise: argmin_u E[c/e^u + u] = ln E[c] for any random c (here exponential with mean 2).
    c = torch.distributions.Exponential(0.5).sample((200_000,))
    u = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([u], max_iter=50)
    opt.step(lambda: (opt.zero_grad(), (loss := uncertainty_objective(c, u).mean()).backward(), loss)[2])
    assert float(u.detach().exp()) == pytest.approx(float(c.mean()), rel=1e-4)
    # Over σ, on a toy with known w·mse(σ): the learned e^{u(σ)} follows it.
    module = LearnedUncertainty(128)
    sigma = torch.logspace(-2, 1.5, 64)
    target = 0.2 + sigma**2 / (1 + sigma**2) + 0.5 * torch.exp(-(sigma.log() ** 2))
    opt = torch.optim.Adam(module.parameters(), lr=0.02)
    for _ in range(1500):
        opt.zero_grad()
        module.objective(target, sigma).mean().backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(module(sigma).exp(), target, rtol=0.03, atol=0)


def test_cli_learned_weight_and_kingma_gao(tmp_path, digits_zip):
    args = ['--outdir', tmp_path, '--data', digits_zip, '--device=cpu', '--workers=0', *TINY_NET_ARGS]
    c = train_config(*args, '--weight=learned', '--sampler=kingma-gao', '--info-refresh=2', '--info-warmup=4')
    assert c['loss_kwargs'] == dict(class_name='training.loss.DenoisingLoss', weight='edm', sigma_data=0.5,
                                    learned_uncertainty=True)  # fmt: skip
    assert c['network_kwargs']['uncertainty_channels'] == 128
    noise = c['noise_kwargs']
    assert noise['class_name'] == 'infonoise.kingma_gao.KingmaGao' and noise['weight'] == 'edm'
    assert (noise['refresh_kimg'], noise['warmup_kimg'], noise['base']) == (2, 4, 'lognormal')
    assert train_config(*args, '--precond=ve', '--sampler=kingma-gao')['noise_kwargs']['base'] == 'loguniform'
    plain = train_config(*args)
    assert 'learned_uncertainty' not in plain['loss_kwargs'] and 'uncertainty_channels' not in plain['network_kwargs']
    with pytest.raises(Exception, match='--info-gate-n only applies'):
        train_config(*args, '--sampler=kingma-gao', '--info-gate-n=2')
    # A real run through the command line: 63 steps of 16 (1 kimg), refreshing at every step from the second.
    flags = ['--batch=16', '--duration=0.001', '--tick=1', '--info-refresh=0.016', '--info-warmup=0.016']
    result = invoke(train.main, *args, '--weight=learned', '--sampler=kingma-gao', *flags)
    assert result.exit_code == 0, result.output
    assert 'refreshes 62' in result.output


KINGMA_GAO = dict(class_name='infonoise.kingma_gao.KingmaGao', weight='edm', num_bins=4, refresh_kimg=0.016,
                  warmup_kimg=0.016)  # fmt: skip


def test_learned_training_runs_and_resumes(tmp_path, digits_zip):
    # 20 steps of batch 8 with u learned and σ from KingmaGao (importance weights from its first refresh on), and the
    # same run stopped half-way and resumed: identical weights, u included, and identical sampler state.
    extra = dict(
        network_kwargs=dict(tiny_config(digits_zip, tmp_path / 'x')['network_kwargs'], uncertainty_channels=128),
        loss_kwargs=dict(class_name='training.loss.DenoisingLoss', weight='edm', sigma_data=0.5,
                         learned_uncertainty=True),
        noise_kwargs=KINGMA_GAO, total_kimg=0.16, kimg_per_tick=0.04, state_dump_ticks=1, snapshot_ticks=2,
    )  # fmt: skip
    straight = tl.training_loop(**tiny_config(digits_zip, tmp_path / 'a', **extra))
    assert straight.noise_sampler.refreshes > 3 and straight.noise_sampler.table is not None
    assert straight.net.uncertainty.weight.abs().sum() > 0  # u learned something.
    tl.training_loop(**tiny_config(digits_zip, tmp_path / 'b', **dict(extra, total_kimg=0.08)))
    state = str(tmp_path / 'b' / 'training-state-000000.pt')
    resumed = tl.training_loop(**tiny_config(digits_zip, tmp_path / 'c', resume_state=state, **extra))
    for (name, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sc = straight.noise_sampler.state_dict(), resumed.noise_sampler.state_dict()
    assert sa['refreshes'] == sc['refreshes'] and torch.equal(sa['g'], sc['g'])
