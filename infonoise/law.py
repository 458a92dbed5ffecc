"""From the information target to the law σ is drawn from (BuildSampler, Algorithm 1 line 16), two ways.

`build='paper'` is Algorithm 1 and App. D as written: the floor ε is mixed into the emphasis, φ = (1 − ε)ρ + ε·LU,
π ∝ φ/w is tabulated at the K bin centres and drawn from a CDF that is linear in σ between them
(`InverseCDFTable`). Two things follow that matter outside EDM's objective: the floor is divided by w too, so
with w = 1/σ² (plain ε-prediction) its share of the draws is not ε but most of them; and nothing is drawn below the
first or above the last bin centre, so the outermost half-bins (DDPM's last 15 timesteps) are never trained.

`build='continuous'` (the default) keeps the information target π_info ∝ ρ/w (Eq. 16) and changes only how it is
turned into draws:
- the table's points are [σ_min, the K centres, σ_max], with the end values held from the first and last centre,
  so the law covers the whole estimation range: every σ (every timestep) in it keeps a positive density;
- the density per unit ln σ is linear between points (`LogLinearTable`): continuous, no saw-tooth in t;
- the floor is a mixture in the final law: π = (1 − ε)·π_info + ε·(log-uniform on [σ_min, σ_max]), so ε is
  the floor's share of the draws whatever the weight w.

Three variants act on π_info before the floor, each an InfoNoise option (docs/library.md gives the rationale):
`projection='lognormal'` replaces it by the log-normal with the same mean and variance of ln σ (a logit-normal in
t for flow matching: the family tuned defaults live in, placed by the information profile); `temper=β` takes the
geometric mixture base^(1−β)·π_info^β with the warm-up base law (β = 1: InfoNoise, β = 0: the base).
"""

import math

import torch

from infonoise.profile import LogGrid
from infonoise.samplers import NoiseSampler
from infonoise.table import LogLinearTable

BUILDS = ('continuous', 'paper')
PROJECTIONS = (None, 'lognormal')


def table_points(grid: LogGrid) -> torch.Tensor:
    """ln σ of the continuous table's points: σ_min, the K bin centres, σ_max ([K + 2], float64)."""
    edges = grid.edges.to(torch.float64)
    return torch.cat([edges[:1], grid.centers, edges[-1:]]).log()


def extend(values: torch.Tensor) -> torch.Tensor:
    """Per-centre values [K] to the table's points [K + 2], holding the first and the last at the ends."""
    return torch.cat([values[:1], values, values[-1:]])


def base_density(sampler: NoiseSampler, grid: LogGrid) -> torch.Tensor:
    """The density per unit ln σ of a noise sampler with a `cdf`, averaged over each bin ([K] at the centres)."""
    cdf = sampler.cdf(grid.edges.to(torch.float64)).to(torch.float64).cpu()
    return (cdf[1:] - cdf[:-1]).clamp(min=0) / grid.edges.log().diff()


def lognormal_projection(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The normal density in x = ln σ with the mean and variance of the piecewise-linear density g over x."""
    law = LogLinearTable.build(x, g)
    # Moments of the piecewise-linear density by a fine trapezoid: 64 sub-points per interval is exact to ~1e-6.
    fine = torch.linspace(float(x[0]), float(x[-1]), 64 * (x.numel() - 1) + 1, dtype=torch.float64)
    j = (torch.searchsorted(x, fine, right=True) - 1).clamp(0, x.numel() - 2)
    density = torch.lerp(law.density[j], law.density[j + 1], (fine - x[j]) / (x[j + 1] - x[j]))
    mass = torch.trapezoid(density, fine)
    mean = torch.trapezoid(density * fine, fine) / mass
    var = (torch.trapezoid(density * (fine - mean).square(), fine) / mass).clamp(min=1e-12)
    return torch.exp(-0.5 * (x - mean).square() / var) / math.sqrt(2 * math.pi * float(var))


def continuous_law(
    grid: LogGrid,
    target: torch.Tensor,
    floor: float,
    projection: str | None = None,
    temper: float = 1.0,
    base: torch.Tensor | None = None,
) -> tuple[LogLinearTable, torch.Tensor]:
    """The continuous table from π_info (`target`: a density over σ at the K centres, any scale), and the final
    density over σ at the centres (normalised over the bin widths, for the profile). `base` is the base law's
    density per unit ln σ at the centres (for `temper` < 1)."""
    x = table_points(grid)
    g = extend(target * grid.centers)  # Per unit ln σ.
    if temper != 1.0:
        if base is None:
            raise ValueError('temper < 1 needs the base density')
        g_base = extend(base.clamp(min=0))
        g = g_base.pow(1 - temper) * g.pow(temper)  # Any scale: the table normalises.
    if projection == 'lognormal':
        g = lognormal_projection(x, g)
    elif projection is not None:
        raise ValueError(f'Unknown projection "{projection}"; choose from None, "lognormal"')
    info = LogLinearTable.build(x, g).density
    table = LogLinearTable.build(x, (1 - floor) * info + floor / float(x[-1] - x[0]))
    sigma = grid.centers
    final = table.density[1:-1] / sigma
    return table, final / float((final * grid.widths).sum())
