"""EDM2's learned uncertainty weighting: a rival of InfoNoise that learns the loss weight instead of the σ density.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (CVPR 2024), Sec. 5 and App. B.2:
the per-sample loss becomes
    L = w(σ)·mse / e^{u(σ)} + u(σ),
with u(σ) the log-variance predicted by a small network of the noise embedding: Fourier features of
c_noise = ln(σ)/4 (fixed random frequencies f and phases φ, √2·cos(2π(f·c_noise + φ)), 128 channels) and one linear
layer to a single output. Minimising L over u at each σ gives e^{u(σ)} = E[w(σ)·mse | σ], so every σ contributes a
normalised loss of about 1: the learned factor e^{−u} tends to 1/(w·mse).

What InfoNoise divides out when the weight is learned: only the static w(σ) (InfoNoise's `weight`, Eq. 16); it knows
nothing of e^{−u}. The gradient's emphasis per σ is then π(σ)·w(σ)·e^{−u(σ)}·(d mse) ≈ π(σ)·(d mse)/mse(σ): InfoNoise's
π still allocates the draws, but each draw counts per unit of NORMALISED loss, so the effective emphasis becomes
≈ π(σ) per unit of normalised loss, not the information profile ρ per unit of raw loss that InfoNoise aims at. Use
learned uncertainty with a fixed sampler (EDM2's setting), or read an InfoNoise run with it in that light
(docs/library.md, "Adaptive and learned rivals").
"""

import math

import torch

# Seed of the generator that draws the fixed Fourier frequencies and phases: every network gets the same ones.
FOURIER_SEED = 0


class LearnedUncertainty(torch.nn.Module):
    """u(σ) = a·(√2·cos(2π(f·ln(σ)/4 + φ))) + b with f ~ N(0, 1), φ ~ U[0, 1) fixed (buffers) and the linear layer
    (a, b) zero-initialised, so u ≡ 0 and the objective equals the weighted loss at the start (EDM2 App. B.2; EDM2's
    layer has no bias b, ours lets u learn a constant directly)."""

    def __init__(self, channels: int = 128, seed: int = FOURIER_SEED):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f'channels must be an integer >= 1, got {channels!r}')
        # Drawn on the CPU from a generator of their own: the global RNG (and so a network's initialisation order,
        # which follows EDM's) is untouched, and a network built on the meta device gets them too.
        with torch.device('cpu'):
            gen = torch.Generator().manual_seed(seed)
            freqs, phases = torch.randn(channels, generator=gen), torch.rand(channels, generator=gen)
        self.register_buffer('freqs', freqs)
        self.register_buffer('phases', phases)
        self.weight = torch.nn.Parameter(torch.zeros(1, channels))
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def features(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fourier features [N, channels] of c_noise = ln(σ)/4 (EDM2's MPFourier)."""
        c_noise = sigma.to(torch.float32).reshape(-1).log() / 4
        return torch.cos(2 * math.pi * (c_noise[:, None] * self.freqs[None, :] + self.phases[None, :])) * math.sqrt(2)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """u(σ) [N] (float32) for σ of any shape with N elements."""
        u = torch.nn.functional.linear(self.features(sigma), self.weight.to(torch.float32), self.bias.to(torch.float32))
        return u.reshape(-1).to(torch.float32)  # float32 also under autocast.

    def objective(self, weighted_loss: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """EDM2's per-sample objective w·mse/e^{u(σ)} + u(σ) ([N]) from the weighted loss w(σ)·mse [N]."""
        return uncertainty_objective(weighted_loss, self(sigma))


def uncertainty_objective(weighted_loss: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """w·mse / e^u + u (EDM2 Sec. 5, per sample): minimal over u at e^u = w·mse."""
    return weighted_loss / u.exp() + u
