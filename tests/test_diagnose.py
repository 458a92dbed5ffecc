"""Offline profiles (diagnose.py) and the exact empirical-Bayes denoiser (infonoise.empirical_bayes) against
brute force and closed forms; the profile file against its readers; the CLI's errors."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import diagnose
from bench.gaussian import GaussianDenoiser, exact_profile
from infonoise import oracles
from infonoise.empirical_bayes import EmpiricalBayesDenoiser, empirical_bayes_denoiser
from infonoise.grids import edm_grid, infogrid
from infonoise.info_noise import InfoNoise
from infonoise.plots import save_denoising_figure, save_profile_plot
from infonoise.profile import LogGrid, Profile
from training.networks import EDMPrecond
from training.sampling import edm_sampler


def random_points(num, shape=(1, 4, 4), seed=0):
    return torch.randn([num, *shape], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_cli(*args):
    return CliRunner().invoke(diagnose.main, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------------------------
# The empirical-Bayes denoiser.


def test_bayes_denoiser_equals_direct_softmax():
    data, x = random_points(23, (2, 3, 3), seed=1), 1.5 * random_points(9, (2, 3, 3), seed=2)
    sigma = torch.tensor([0.05, 0.3, 0.8, 1.5, 2.5, 4.0, 10.0, 50.0, 1e3], dtype=torch.float64)
    # Brute force: explicit differences, then softmax over -‖x - x_i‖²/(2σ²).
    sq_dist = (x.reshape(9, 1, -1) - data.reshape(1, 23, -1)).square().sum(-1)
    weights = torch.softmax(-sq_dist / (2 * sigma[:, None] ** 2), dim=1)
    expected = (weights @ data.reshape(23, -1)).reshape(x.shape)
    assert weights.max(1).values.min() < 0.9 and weights.max(1).values.max() > 0.999  # Spread and peaked rows.
    for chunk_size in (4, 9, 100):  # Observations in chunks with a partial last one, exactly one, one larger than M.
        got = EmpiricalBayesDenoiser(data, chunk_size=chunk_size)(x, sigma.reshape(-1, 1, 1, 1))
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # One scalar σ for the whole batch.
    scalar = torch.softmax(-sq_dist / (2 * 1.2**2), dim=1) @ data.reshape(23, -1)
    torch.testing.assert_close(EmpiricalBayesDenoiser(data, 4)(x, 1.2), scalar.reshape(x.shape), rtol=1e-10, atol=1e-12)


def test_bayes_denoiser_module_and_function_agree():
    # The network wraps infonoise.empirical_bayes.empirical_bayes_denoiser (also oracles'): chunking, σ per image
    # in EDM's [M, 1, 1, 1] shape and the cached norms change nothing.
    data, x = random_points(31, (3, 4, 4), seed=11), 2 * random_points(10, (3, 4, 4), seed=12)
    sigma = torch.logspace(-2, 2, 10, dtype=torch.float64)
    expected = empirical_bayes_denoiser(x, sigma, data)
    assert oracles.empirical_bayes_denoiser is empirical_bayes_denoiser
    torch.testing.assert_close(empirical_bayes_denoiser(x, sigma.reshape(-1, 1, 1, 1), data), expected, rtol=0, atol=0)
    for chunk_size in (None, 3, 10):
        got = EmpiricalBayesDenoiser(data, chunk_size=chunk_size)(x, sigma.reshape(-1, 1, 1, 1))
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # At σ = 1e-3 an observation on a data point is that point, through either.
    assert torch.equal(EmpiricalBayesDenoiser(data)(data[:5], 1e-3), data[:5])
    with pytest.raises(ValueError, match='one per observation'):
        empirical_bayes_denoiser(x, torch.ones(3), data)


def test_bayes_mmse_limits():
    data = random_points(12)
    net = EmpiricalBayesDenoiser(data)
    # 48 samples are four full passes over the 12 points, so the σ -> ∞ limit is the data variance exactly.
    clean = data[diagnose.draw_indices(12, 48, seed=3)]
    assert torch.equal(torch.bincount(diagnose.draw_indices(12, 48, seed=3)), torch.full([12], 4))
    mse, stderr = diagnose.denoising_mse(net, clean, torch.tensor([1e-3, 1e5]), batch_size=20, seed=4)
    total_variance = data.reshape(12, -1).var(0, unbiased=False).mean()
    assert mse[0] < 1e-20 and stderr[0] < 1e-20  # The posterior sits on the clean point.
    assert abs(mse[1] / total_variance - 1) < 1e-3  # The posterior is uniform: D = the data mean.


def test_bayes_denoiser_drives_edm_sampler_onto_data_points():
    data = 2 * random_points(6, seed=5)
    net = EmpiricalBayesDenoiser(data)
    assert (net.img_channels, net.img_resolution, net.label_dim, net.sigma_min, net.sigma_max) == (1, 4, 0, 0, np.inf)
    sigma = torch.tensor([0.37, 2.0], dtype=torch.float64)
    assert torch.equal(net.round_sigma(sigma), sigma)  # Every σ > 0 is supported, as in EDM's networks.
    latents = torch.randn([5, 1, 4, 4], generator=torch.Generator().manual_seed(6))
    out = edm_sampler(net, latents, edm_grid(32))
    # The exact denoiser of a finite set memorises: every sample ends on a training point.
    nearest = (out.reshape(5, 1, -1) - data.reshape(1, 6, -1)).square().sum(-1).min(1).values
    assert (nearest < 1e-12).all(), nearest


def test_bayes_denoiser_rejects_bad_input():
    with pytest.raises(ValueError, match='square images'):
        EmpiricalBayesDenoiser(torch.zeros(3, 1, 4, 5))
    net = EmpiricalBayesDenoiser(random_points(3))
    with pytest.raises(ValueError, match='σ > 0'):
        net(random_points(2), 0.0)
    with pytest.raises(ValueError, match='one per image'):
        net(random_points(2), torch.ones(3))


# ----------------------------------------------------------------------------------------------------------------
# Offline profiles.


def test_offline_profile_of_the_exact_gaussian_denoiser():
    lam = torch.logspace(-3, 0.5, 16, dtype=torch.float64)
    net = GaussianDenoiser(lam, img_channels=1, img_resolution=4)
    clean = lam.sqrt() * torch.randn(4096, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sigma = torch.logspace(-2.5, 1.5, 9, dtype=torch.float64)
    mse, stderr = diagnose.denoising_mse(net, clean.reshape(-1, 1, 4, 4), sigma, batch_size=1000, seed=8)
    exact = exact_profile(lam, sigma).mmse / 16  # Per pixel, as the loss reports.
    # Tolerance: 5 Monte-Carlo standard errors, which are themselves below 2% of the value.
    assert (stderr < 0.02 * exact).all(), (stderr / exact).tolist()
    assert ((mse - exact).abs() < 5 * stderr).all(), ((mse - exact) / stderr).tolist()


@pytest.mark.parametrize('endpoint', ['continuous', 'discrete'])
def test_build_profile_equals_an_infonoise_refresh(endpoint):
    sampler = InfoNoise(num_bins=24, ema_rate=1.0, min_count=1, warmup_kimg=0, refresh_kimg=1000, endpoint=endpoint)
    sigma = sampler.grid.centers
    mse = 0.3 * sigma**2 / (0.3 + sigma**2) + 0.01 * sigma**2 / (0.01 + sigma**2)
    sampler.observe(sigma.float(), mse.float())
    assert sampler.refresh()
    expected = sampler.profile()
    got = diagnose.build_profile(sampler.grid, sampler.mse, endpoint=endpoint)
    assert got.pivot == expected.pivot
    for name in ('sigma', 'mse', 'rate', 'gated', 'rho', 'u', 'pi', 'phi', 'weight'):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-12, atol=0, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# The command line and its files.


def recorded_titles(monkeypatch) -> list[str]:
    """The titles diagnose.py gives its profile plots (which are still drawn)."""
    titles = []

    def recording(profile, path, title=None):
        titles.append(title)
        save_profile_plot(profile, path, title)

    monkeypatch.setattr(diagnose, 'save_profile_plot', recording)
    return titles


def test_bayes_cli_writes_a_profile_that_training_and_generate_readers_take(digits_zip, tmp_path, monkeypatch):
    out, plot = tmp_path / 'new' / 'exact.json', tmp_path / 'plots' / 'exact.png'  # Folders that do not exist yet.
    titles = recorded_titles(monkeypatch)
    result = run_cli(
        'bayes', '--data', digits_zip, '--out', out, '--plot', plot, '--points', 12, '--samples', 64, '--device', 'cpu'
    )
    assert result.exit_code == 0, result.output
    assert 'Rate r = mse/σ³ peaks at σ =' in result.output
    record = json.loads(out.read_text())
    profile = Profile.from_dict(record)
    torch.testing.assert_close(profile.sigma, LogGrid.make(12, 0.002, 80).centers, rtol=1e-15, atol=0)
    # A finite data set has discrete endpoints (bounded entropy) whatever its pixels.
    assert record['source'] == 'empirical-bayes:64 images' and record['endpoint'] == 'discrete'
    assert record['mse'][0] == 0  # The exact denoiser of a finite set is perfect at σ -> 0.
    assert record['peaks']['rate'] == record['sigma'][int(np.argmax(record['rate']))]
    u_info = np.array(record['u_info'])
    assert (np.diff(u_info) >= 0).all() and 0 <= u_info[0] < u_info[-1] <= 1
    assert PIL.Image.open(plot).format == 'PNG' and titles == ['Exact profile (empirical Bayes, 64 images)']

    loaded = Profile.load(str(out))  # As `generate.py --grid=infogrid --profile` reads it.
    grid = infogrid(10, loaded)  # On the range the profile was made on.
    assert grid[0] == 80 and grid[-2] == 0.002 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()


def save_snapshot(path, img_resolution, label_dim):
    torch.manual_seed(0)
    kwargs = dict(img_resolution=img_resolution, img_channels=1, label_dim=label_dim, model_type='SongUNet',
                  model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)  # fmt: skip
    net = EDMPrecond(**kwargs)
    snapshot = dict(format='infonoise-edm-snapshot', version=1, ema=net.state_dict(),
                    network_kwargs={'class_name': 'training.networks.EDMPrecond', **kwargs})  # fmt: skip
    torch.save(snapshot, path)
    return str(path)


def test_profile_cli_on_a_conditional_network(digits_zip, tmp_path, monkeypatch):
    network, out = save_snapshot(tmp_path / 'net.pt', 8, 10), tmp_path / 'net.json'
    titles = recorded_titles(monkeypatch)
    args = ['--points', 4, '--samples', 8, '--batch', 8, '--endpoint', 'discrete', '--weight', 'uniform']
    args += ['--plot', tmp_path / 'net.png']
    result = run_cli('profile', '--network', network, '--data', digits_zip, '--out', out, *args, '--device', 'cpu')
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    profile = Profile.from_dict(record)
    assert record['source'] == f'network:{network}' and record['endpoint'] == 'discrete'
    assert len(profile.sigma) == 4 and (profile.mse > 0).all() and (profile.weight == 1).all()
    torch.testing.assert_close(profile.rate, profile.mse / profile.sigma**3, rtol=1e-15, atol=0)
    assert titles == [f'Offline profile ({network})'] and (tmp_path / 'net.png').is_file()


def test_figure_cli_rows_of_noisy_and_denoised_images(digits_zip, digits8, tmp_path, monkeypatch):
    calls = []

    def recording(*args):
        calls.append((args, save_denoising_figure(*args)))
        return calls[-1][1]

    monkeypatch.setattr(diagnose, 'save_denoising_figure', recording)
    out = tmp_path / 'figures' / 'figure.png'  # diagnose.py creates the folder.
    result = run_cli('figure', '--data', digits_zip, '--out', out, '--images', 3, '--sigmas', '0.001,1,1000')
    assert result.exit_code == 0, result.output
    assert result.output == f'Wrote {out}: 3 images x 3 noise levels\n'
    (grid, sigmas, labels, pad, _, title), (left, top) = calls[0]
    assert sigmas == [0.001, 1, 1000] and labels == ['noisy', 'denoised'] * 3 and pad == 2
    assert title == 'Bayes-optimal denoising under the empirical prior of 64 images'
    # 8x8 digits enlarged 8 times into 64-pixel cells, 2 white pixels between and around them.
    assert grid.shape == (2 + 6 * 66, 2 + 3 * 66, 1)
    image = np.array(PIL.Image.open(out).convert('L'))
    assert np.array_equal(image[top : top + grid.shape[0], left : left + grid.shape[1]], grid[:, :, 0])
    shown = diagnose.draw_indices(64, 3, seed=0)
    mean = digits8[0].astype(np.float64).mean(0)
    for row, index in enumerate(shown.tolist()):
        y = top + 2 + (2 * row + 1) * 66  # The denoised row of this image.
        cells = [image[y : y + 64 : 8, left + 2 + 66 * col :][:, :64:8] for col in range(3)]
        # At σ = 0.001 the denoiser returns the image itself; at σ = 1000 the data set's mean image.
        assert np.array_equal(cells[0], digits8[0][index])
        assert np.abs(cells[2].astype(np.float64) - mean).max() <= 1.5


def test_figure_cli_says_one_image_and_one_noise_level(digits_zip, tmp_path):
    result = run_cli('figure', '--data', digits_zip, '--out', tmp_path / 'f.png', '--images', 1, '--sigmas', '2')
    assert result.exit_code == 0 and result.output.endswith(': 1 image x 1 noise level\n'), result.output


def bad_invocations(digits_zip, tmp_path):
    return [
        (['bayes', '--data', tmp_path / 'missing.zip', '--out', tmp_path / 'p.json'], 'no such file'),
        (['bayes', '--data', digits_zip, '--out', tmp_path / 'net.pt' / 'p.json'], 'exists and is not a folder'),
        (['bayes', '--data', digits_zip, '--out', tmp_path / 'p.json', '--sigma-min', 1, '--sigma-max', 0.5], 'Need 0 <'),
        (['figure', '--data', tmp_path, '--out', tmp_path / 'f.png'], 'No images found'),
        (['profile', '--network', digits_zip, '--data', digits_zip, '--out', tmp_path / 'p.json'], 'Cannot load network'),
        (['profile', '--network', tmp_path / 'net.pt', '--data', digits_zip, '--out', tmp_path / 'p.json'], 'shape [1, 8, 8]'),
    ]  # fmt: skip


def test_cli_errors_are_one_line(digits_zip, tmp_path):
    save_snapshot(tmp_path / 'net.pt', 16, 0)
    for args, message in bad_invocations(digits_zip, tmp_path):
        result = run_cli(*args, '--device', 'cpu')
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith('Error: ') and result.output.count('\n') == 1, result.output
        assert message in result.output, result.output
    # Malformed option values are click's usage errors.
    result = run_cli('figure', '--data', digits_zip, '--out', tmp_path / 'f.png', '--sigmas', '1,-2')
    assert result.exit_code == 2 and 'all positive' in result.output
    assert not list(tmp_path.glob('*.json')) and not list(tmp_path.glob('*.png'))


def test_compare_puts_grids_side_by_side_under_titles(tmp_path):
    rng = np.random.default_rng(0)
    left, right = rng.integers(0, 256, (70, 70), dtype=np.uint8), rng.integers(0, 256, (50, 90), dtype=np.uint8)
    PIL.Image.fromarray(left).save(tmp_path / 'a.png')
    PIL.Image.fromarray(right).save(tmp_path / 'b.png')
    out = tmp_path / 'figs' / 'c.png'
    titles = ['EDM ρ-grid, 9 steps (17 NFE)', 'InfoGrid']
    result = run_cli('compare', '--image', tmp_path / 'a.png', '--title', titles[0], '--image', tmp_path / 'b.png',
                 '--title', titles[1], '--out', out)  # fmt: skip
    assert result.exit_code == 0, result.output
    row = np.asarray(PIL.Image.open(out))
    assert row.ndim == 2  # Grayscale in, grayscale out.

    # Each image appears once, pixel for pixel, left to right, below its title's ink.
    def find(image):
        h, w = image.shape
        hits = [(y, x) for y in range(row.shape[0] - h + 1) for x in range(row.shape[1] - w + 1)
                if row[y, x] == image[0, 0] and np.array_equal(row[y : y + h, x : x + w], image)]  # fmt: skip
        assert len(hits) == 1
        return hits[0]

    (ya, xa), (yb, xb) = find(left), find(right)
    assert xa + 70 < xb and ya == yb and (row[:ya] < 128).any() and (row[:ya] < 128).sum() > 100
    assert run_cli('compare', '--image', tmp_path / 'a.png', '--out', out).exit_code != 0  # No title.
    result = run_cli('compare', '--image', tmp_path / 'a.png', '--title', 'x', '--title', 'y', '--out', out)
    assert result.exit_code == 1 and 'Error: Need one title per image, got 1 images and 2 titles' in result.output
