"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Section 3
and Appendix C): power-function EMA profiles tracked during training, and the least-squares reconstruction of any
other profile from stored snapshots of them.

A power-function EMA of exponent γ averages the weights θ(τ) seen up to time t with the kernel
p_t(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]; its standard deviation relative to t is σ_rel (Eq. 123). Tracked after each
step of Δ images with β = (1 − Δ/t)^(γ+1), t = images seen after the step (Eq. 127), the average is exactly p_t
integrated over each step: step i of n gets weight (i^(γ+1) − (i−1)^(γ+1)) / n^(γ+1). Time is counted in images
everywhere; the reconstruction does not depend on the unit.
"""

import copy
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from training import checkpoint, run_dir

__all__ = [
    'SIGMA_REL_MAX', 'sigma_rel_to_gamma', 'gamma_to_sigma_rel', 'parse_sigma_rels', 'power_beta', 'kernel_dot',
    'solve_coefficients', 'kernel_residual', 'combine', 'PowerFunctionEMA', 'reconstruct_run',
]  # fmt: skip

SIGMA_REL_MAX = math.sqrt(1 / 12)  # σ_rel at γ = 0, the plain average of all weights; larger widths have no γ > 0.


def gamma_to_sigma_rel(gamma):
    """Eq. 123: σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3)))."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel):
    """Eq. 126 (Algorithm 2): γ is the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²) γ + (12 − σ_rel⁻²).
    ValueError for σ_rel outside (0, SIGMA_REL_MAX)."""
    sigma_rel = np.asarray(sigma_rel, dtype=np.float64)
    if not np.all((sigma_rel > 0) & (sigma_rel < SIGMA_REL_MAX)):
        raise ValueError(f'σ_rel must lie in (0, {SIGMA_REL_MAX:.4f}) (γ > 0); got {sigma_rel.tolist()}')
    roots = [np.roots([1, 7, 16 - s**-2, 12 - s**-2]) for s in sigma_rel.ravel()]
    return np.array([r[np.abs(r.imag) < 1e-9].real.max() for r in roots]).reshape(sigma_rel.shape)


def parse_sigma_rels(text: str | Sequence[float]) -> list[float]:
    """'0.05,0.1' (or a list, as a preset gives it) -> [0.05, 0.1]: sorted, without repeats, each in
    (0, SIGMA_REL_MAX); ValueError else."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(',')
    try:
        values = sorted({float(x) for x in items})
    except (TypeError, ValueError):
        raise ValueError(f'"{text}" is not a comma-separated list of numbers') from None
    bad = [v for v in values if not 0 < v < SIGMA_REL_MAX]
    if bad:
        raise ValueError(f'σ_rel {bad[0]:g} is out of range: each must lie in (0, {SIGMA_REL_MAX:.4f})')
    return values


def power_beta(gamma: float, t: float, delta: float) -> float:
    """Eq. 127: β = (1 − Δ/t)^(γ+1) for the step of Δ images that ends at t images (0 at the first step)."""
    return float((1 - delta / t) ** (gamma + 1))


def kernel_dot(t_a, gamma_a, t_b, gamma_b):
    """Eq. 151 (Algorithm 3): ∫ p_a p_b dτ of two power-function kernels ending at t_a and t_b,
    (γa+1)(γb+1) (t_a/t_b)^e / ((γa+γb+1) max(t_a, t_b)) with e = γb if t_a < t_b else −γa (broadcasts)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    e = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** e / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(times, gammas, t_out, gammas_out) -> np.ndarray:
    """Algorithm 3: coefficients X [inputs, outputs] whose combination Σ_i X_ij p_i of the stored kernels (t_i, γ_i)
    is the least-squares fit (L2 over τ) of the kernel (t_out, γ_j); each column rescaled to sum to 1, so that
    constant weights stay constant. Float64 throughout."""
    t_in, g_in = (np.asarray(x, dtype=np.float64).reshape(-1, 1) for x in (times, gammas))
    g_out = np.asarray(gammas_out, dtype=np.float64).reshape(1, -1)
    gram = kernel_dot(t_in, g_in, t_in.T, g_in.T)
    target = kernel_dot(t_in, g_in, np.float64(t_out), g_out)
    coefs = np.linalg.solve(gram, target)
    return coefs / coefs.sum(axis=0, keepdims=True)


def kernel_residual(times, gammas, coefs, t_out, gammas_out) -> np.ndarray:
    """‖Σ_i X_ij p_i − p_out,j‖₂ per output j, in closed form: sqrt(xᵀAx − 2xᵀb + c) from kernel_dot. By
    Cauchy-Schwarz, a reconstructed average misses the true one by at most this times ‖θ‖₂ over [0, t_out]."""
    t_in, g_in = (np.asarray(x, dtype=np.float64).reshape(-1, 1) for x in (times, gammas))
    g_out = np.asarray(gammas_out, dtype=np.float64).reshape(1, -1)
    gram = kernel_dot(t_in, g_in, t_in.T, g_in.T)
    target = kernel_dot(t_in, g_in, np.float64(t_out), g_out)
    norm = kernel_dot(t_out, g_out, t_out, g_out)[0]
    coefs = np.asarray(coefs, dtype=np.float64)
    squared = np.einsum('ij,ik,kj->j', coefs, gram, coefs) - 2 * np.sum(coefs * target, axis=0) + norm
    return np.sqrt(np.maximum(squared, 0))


def combine(stored: Iterable[tuple[np.ndarray, dict]], num_outputs: int) -> list[dict]:
    """Σ_i coefs_i[j] × state_dict_i for each output j, summed in float64 and returned in each tensor's own dtype;
    tensors that are not floating point (and every buffer a coefficient cannot mix) come from the last state dict.
    `stored` yields (coefficients [num_outputs], state dict) one at a time, so that one is in memory at once."""
    sums, last = [dict() for _ in range(num_outputs)], None
    for coefs, state in stored:
        for j in range(num_outputs):
            for key, value in state.items():
                if value.is_floating_point():
                    term = value.detach().to(torch.float64) * float(coefs[j])
                    sums[j][key] = sums[j][key] + term if key in sums[j] else term
        last = state
    if last is None:
        raise ValueError('No stored profiles to combine')
    return [
        {k: sums[j][k].to(v.dtype) if k in sums[j] else v.clone() for k, v in last.items()} for j in range(num_outputs)
    ]


class PowerFunctionEMA:
    """One EMA copy of a network per σ_rel, each updated after every step with β of Eq. 127 (EDM2's
    PowerFunctionEMA). Buffers follow the network's. Identical on every rank, as the network is."""

    def __init__(self, net: torch.nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [float(g) for g in sigma_rel_to_gamma(self.sigma_rels)]
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, nimg: int, batch_size: int) -> None:
        """Average in the weights after the step of `batch_size` images that brings the run to `nimg` images."""
        for gamma, ema in zip(self.gammas, self.emas):
            beta = power_beta(gamma, nimg, batch_size)
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))
            for b_ema, b_net in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b_net)

    def profiles(self) -> list[dict]:
        """Each profile's σ_rel, γ and weights (CPU tensors): what a stored profile file holds."""
        return [
            dict(sigma_rel=s, gamma=g, ema={k: v.detach().cpu().clone() for k, v in ema.state_dict().items()})
            for s, g, ema in zip(self.sigma_rels, self.gammas, self.emas)
        ]

    def state_dict(self) -> dict:
        return dict(sigma_rels=list(self.sigma_rels), emas=[p['ema'] for p in self.profiles()])

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; ValueError if it tracked other σ_rel values."""
        if [float(s) for s in state['sigma_rels']] != self.sigma_rels:
            raise ValueError(f'The state tracks σ_rel {state["sigma_rels"]}, not {self.sigma_rels}')
        for ema, weights in zip(self.emas, state['emas']):
            ema.load_state_dict(weights)


def reconstruct_run(directory: str, sigma_rels: Sequence[float], at_kimg: int | None = None) -> list[dict]:
    """Network snapshots (checkpoint.snapshot_record) of a run at `at_kimg` (None = its newest stored profiles), one
    per σ_rel, reconstructed from all its phema-NNNNNN.pt files up to then. Each also holds
    phema = {sigma_rel, gamma, residual}: the kernel residual relative to the target kernel's norm. ValueError of one
    line for a run with no profiles, σ_rel out of range, or a time with no stored profiles."""
    found = run_dir.find(directory, 'phema')
    if not found:
        raise ValueError(f'{directory} holds no post-hoc EMA profiles (phema-*.pt); train with --ema-profiles')
    at_kimg = max(found) if at_kimg is None else at_kimg
    if at_kimg > max(found):
        raise ValueError(f'--at-kimg={at_kimg} is beyond the newest stored profiles ({max(found)} kimg)')
    if at_kimg not in found:
        raise ValueError(f'--at-kimg={at_kimg}: no profiles stored then; stored at {", ".join(map(str, found))} kimg')
    sigma_rels = parse_sigma_rels(sigma_rels)
    gammas_out = sigma_rel_to_gamma(sigma_rels)

    # Every profile stored up to then: (nimg, γ, file, index in the file); the weights are read later, file by file.
    target = checkpoint.load_phema(found[at_kimg], mmap=True)
    inputs = []
    for kimg, path in found.items():
        data = checkpoint.load_phema(path, mmap=True)
        if kimg > at_kimg or data['nimg'] > target['nimg']:
            continue
        if data['network_kwargs'] != target['network_kwargs']:
            raise ValueError(f'"{path}" holds profiles of a different network than "{found[at_kimg]}"')
        inputs += [(data['nimg'], p['gamma'], path, i) for i, p in enumerate(data['profiles'])]
    times, gammas = [x[0] for x in inputs], [x[1] for x in inputs]
    try:
        coefs = solve_coefficients(times, gammas, target['nimg'], gammas_out)
    except np.linalg.LinAlgError:
        raise ValueError('The stored profiles do not determine a reconstruction (singular system)') from None
    residual = kernel_residual(times, gammas, coefs, target['nimg'], gammas_out)
    residual /= np.sqrt(kernel_dot(target['nimg'], gammas_out, target['nimg'], gammas_out))

    def stored():
        for path in dict.fromkeys(x[2] for x in inputs):
            profiles = checkpoint.load_phema(path)['profiles']
            yield from ((coefs[k], profiles[x[3]]['ema']) for k, x in enumerate(inputs) if x[2] == path)

    kwargs = {k: target.get(k) for k in ('loss_kwargs', 'noise_kwargs', 'augment_kwargs', 'dataset_kwargs')}
    snapshots = []
    for j, weights in enumerate(combine(stored(), len(gammas_out))):
        snapshot = checkpoint.snapshot_record(target['nimg'], target['network_kwargs'], weights, target['profile'],
                                              **kwargs)  # fmt: skip
        snapshot['phema'] = dict(sigma_rel=sigma_rels[j], gamma=float(gammas_out[j]), residual=float(residual[j]))
        snapshots.append(snapshot)
    return snapshots
