"""The exact Bayes denoiser of a finite data set (InfoNoise paper, App. A.2 and D.1).

Under the empirical prior p(x0) = (1/N) Σ_i δ(x0 - x_i) and the channel x = x0 + σε, the posterior puts weight
w_i(x; σ) = softmax_i(-‖x - x_i‖²/(2σ²)) on each data point (Eqs. 31 and 54), and the Bayes denoiser is the
posterior mean D*(x; σ) = Σ_i w_i x_i (Eq. 32). Its mean squared error, averaged over x0 drawn from the data and
over the noise, is the exact mmse(σ) of the data set, so the offline-profile code of `diagnose.py` turns it
into the exact entropy-rate profile r = mmse/σ³ (Eq. 11).

`empirical_bayes_denoiser` is that formula, the one implementation of it: float64, distances from one matrix
product ‖x‖² + ‖x_i‖² - 2xᵀx_i, and the softmax in log space (logsumexp, D.1). `EmpiricalBayesDenoiser` wraps it
with the attributes and call signature of EDM's preconditioned networks, so the offline profile and EDM's
solvers (`training.sampling`) take it in place of a trained network; it evaluates the observations in chunks so
that the [chunk, N] distance matrix stays small however large the batch.
"""

import torch

# Entries of the [observations, data] distance matrix evaluated at once (32 MB in float64).
_CHUNK_ENTRIES = 4_000_000


def empirical_bayes_denoiser(
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    data: torch.Tensor,
    data_sq: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Posterior mean Σ_i w_i x_i, w = softmax_i(-‖x - x_i‖²/(2σ²)), under the empirical prior of `data` (Eqs.
    31-32, App. D.1); float64 with the shape of x, on x's device.

    x is [M, ...] and data [N, ...] with the same trailing shape; σ is a scalar or one value per row of x (any
    shape with M entries). `data_sq`, the squared norms ‖x_i‖² [N] of the float64 data, may be passed to save
    recomputing them. Float64 keeps the expanded distances accurate down to σ ~ 1e-3. `exclude` ([M] indices into
    data) leaves one data point out of each row's posterior (a held-out estimate, `oracles.empirical_bayes_mse`).
    """
    if x.shape[1:] != data.shape[1:]:
        raise ValueError(f'Observations {tuple(x.shape)} and data {tuple(data.shape)} differ in trailing shape')
    flat_x = x.reshape(x.shape[0], -1).to(torch.float64)
    flat_data = data.reshape(data.shape[0], -1).to(device=flat_x.device, dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=flat_x.device).reshape(-1, 1)
    if sigma.shape[0] not in (1, flat_x.shape[0]):
        raise ValueError(f'Need one σ or one per observation ({flat_x.shape[0]}), got {sigma.shape[0]}')
    if data_sq is None:
        data_sq = flat_data.square().sum(1)
    sq_dist = flat_x.square().sum(1, keepdim=True) + data_sq.to(flat_x.device) - 2 * flat_x @ flat_data.T
    # Rounding can make the expansion slightly negative for an x on a data point; a distance is never below 0.
    logits = -sq_dist.clamp(min=0) / (2 * sigma**2)
    if exclude is not None:
        logits[torch.arange(len(logits), device=logits.device), exclude.to(logits.device)] = -torch.inf
    weights = torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))
    return (weights @ flat_data).reshape(x.shape)


class EmpiricalBayesDenoiser(torch.nn.Module):
    """D*(x; σ) = Σ_i softmax_i(-‖x - x_i‖²/(2σ²)) x_i over the images `data` [N, C, H, W] (float, EDM's [-1, 1]).

    `chunk_size` observations are denoised at once; by default as many as keep the [chunk, N] distance matrix
    near 4M entries.
    """

    def __init__(self, data: torch.Tensor, chunk_size: int | None = None):
        super().__init__()
        if data.ndim != 4 or data.shape[0] < 1 or data.shape[2] != data.shape[3]:
            raise ValueError(f'Need square images [N, C, H, W] with N >= 1, got shape {tuple(data.shape)}')
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f'chunk_size must be positive, got {chunk_size}')
        flat = data.reshape(data.shape[0], -1).to(torch.float64)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError('The data set has non-finite values')
        self.img_channels = int(data.shape[1])
        self.img_resolution = int(data.shape[2])
        self.label_dim = 0
        self.sigma_min = 0
        self.sigma_max = float('inf')
        self.chunk_size = chunk_size or max(1, _CHUNK_ENTRIES // flat.shape[0])
        self.register_buffer('data', flat)
        # Squared norms ‖x_i‖², computed once for every distance evaluation.
        self.register_buffer('data_sq', flat.square().sum(1))

    @property
    def num_images(self) -> int:
        return self.data.shape[0]

    def round_sigma(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """σ as a tensor: every σ is supported exactly (EDM's networks' round_sigma interface)."""
        return torch.as_tensor(sigma)

    def forward(
        self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None = None, **model_kwargs
    ) -> torch.Tensor:
        """Posterior means for x [M, C, H, W] at σ > 0 (a scalar or one per image, any shape with M entries); float64.

        `class_labels` and other keyword arguments are accepted for the solvers' sake and ignored: the prior is
        the whole data set.
        """
        dim = self.data.shape[1]
        if x.ndim != 4 or x[0].numel() != dim:
            raise ValueError(
                f'Need images [M, {self.img_channels}, {self.img_resolution}, {self.img_resolution}], got {tuple(x.shape)}'
            )
        flat = x.reshape(x.shape[0], -1).to(device=self.data.device, dtype=torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=flat.device).reshape(-1)
        if sigma.numel() not in (1, flat.shape[0]):
            raise ValueError(f'Need one σ or one per image ({flat.shape[0]}), got {sigma.numel()}')
        if not bool((sigma > 0).all()) or not bool(torch.isfinite(sigma).all()):
            raise ValueError('The empirical-Bayes denoiser needs finite σ > 0')
        rows = zip(flat.split(self.chunk_size), sigma.expand(flat.shape[0]).split(self.chunk_size))
        chunks = [empirical_bayes_denoiser(x_i, sigma_i, self.data, self.data_sq) for x_i, sigma_i in rows]
        return torch.cat(chunks).reshape(x.shape)


@torch.no_grad()
def denoising_rows(
    denoiser: torch.nn.Module, clean: torch.Tensor, sigmas: list[float], seed: int = 0, device: str = 'cpu'
) -> torch.Tensor:
    """Figure 1 (bottom) / Figure 12: for each clean image, its noisy inputs x0 + σn across `sigmas` followed by
    their denoised images D(x0 + σn; σ); [2·len(clean)·len(sigmas), C, H, W] float64, row by row.

    One noise image n per clean image serves every σ, so a row shows the same corruption growing.
    """
    if not sigmas or min(sigmas) <= 0:
        raise ValueError('The figure needs at least one noise level, all positive')
    clean = clean.to(torch.float64)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sigma = torch.tensor(sigmas, dtype=torch.float64)
    rows = []
    for image, n in zip(clean, noise):
        noisy = image + sigma.reshape(-1, 1, 1, 1) * n
        rows += [noisy, denoiser(noisy.to(device), sigma.to(device)).to('cpu', torch.float64)]
    return torch.cat(rows)
