"""Loss weights w(σ) of the denoising loss in x₀ space (EDM Table 1; InfoNoise paper Eq. 16 and App. E).

A training loss Σ w(σ)·‖D(x₀ + σε; σ) − x₀‖² spends effort on σ in proportion to p(σ)·w(σ) (the emphasis). InfoNoise
chooses p = ρ/w so that the emphasis follows the information profile ρ, which is why it must know w. Every weight
here maps σ (a tensor, any shape) to w(σ) with that shape (Min-SNR-γ too, a published rival weight); `resolve_weight` turns a name or a callable into one.
Losses written in another parameterisation (ε, v, flow velocity) have an equivalent x₀-space weight:
`infonoise.conversions` gives it.
"""

from collections.abc import Callable

import torch

WeightFn = Callable[[torch.Tensor], torch.Tensor]


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's λ(σ) = (σ² + σ_data²) / (σ·σ_data)² (EDM Table 1; paper Eq. 52)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def inverse_variance_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's VP and VE weight λ(σ) = 1/σ² (EDM Table 1); also the x₀-space weight of an unweighted ε-MSE."""
    return 1 / sigma**2


def uniform_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """λ ≡ 1: allocation-controlled training, where the emphasis equals the noise sampler's density π (paper Sec. 6)."""
    return torch.ones_like(sigma)


def min_snr_weight(sigma: torch.Tensor, sigma_data: float = 0.5, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-γ (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023, Sec. 3.4):
    w(σ) = min(SNR, γ) with SNR = 1/σ² and the paper's γ = 5; σ_data is unused (the common signature).

    The paper weights the x₀-prediction MSE by min(SNR, γ) and the ε-MSE by min(SNR, γ)/SNR. Both are one loss: from
    x = x₀ + σε, x̂₀ − x₀ = −σ(ε̂ − ε), so ε-MSE = x₀-MSE/σ² = SNR·x₀-MSE and min(SNR, γ)/SNR·ε-MSE =
    min(SNR, γ)·x₀-MSE. So in x₀ space, as every weight here, it is min(1/σ², γ): the inverse-variance weight of
    a plain ε-loss, capped at γ for σ < 1/√γ."""
    return (1 / sigma**2).clamp(max=gamma)


WEIGHTS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    'edm': edm_weight,
    'inverse-variance': inverse_variance_weight,
    'uniform': uniform_weight,
    'min-snr': min_snr_weight,
}


def resolve_weight(weight: str | WeightFn, sigma_data: float = 0.5) -> WeightFn:
    """w(σ) from a name in WEIGHTS (σ_data applies to 'edm') or a callable σ -> w(σ), returned as is."""
    if callable(weight):
        return weight
    if weight not in WEIGHTS:
        raise ValueError(f'Unknown loss weight "{weight}"; choose from {", ".join(WEIGHTS)} or pass a callable')
    fn = WEIGHTS[weight]
    return lambda sigma: fn(sigma, sigma_data)
