"""Inference sigma-grids: where a sampler evaluates the denoiser.

A grid is a float64 tensor of N+1 noise levels sigma_0 > sigma_1 > ... > sigma_{N-1} > sigma_N = 0 (EDM's
convention, Karras et al. 2022, Sec. 3): the N-step sampler starts at sigma_0 and integrates down to 0. Grids
are pure functions of their arguments; samplers (`training.sampling.edm_sampler`) take one as input and never
build it themselves. The InfoGrid of the InfoNoise paper (Eq. 19, uniform in cumulative information) joins
EDM's rho-grid here later.
"""

import torch


def edm_grid(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's rho-grid (EDM Eq. 5): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    Returns num_steps + 1 descending float64 values on the CPU: sigma_max, ..., sigma_min, 0. A single step
    gives [sigma_max, 0].
    """
    if num_steps < 1:
        raise ValueError(f'num_steps must be at least 1, got {num_steps}')
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}')
    if rho <= 0:
        raise ValueError(f'rho must be positive, got {rho}')
    if num_steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)

    # Interpolate linearly in sigma^(1/rho), in EDM's order of operations.
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    sigmas = (
        sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
