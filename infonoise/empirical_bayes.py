"""The exact Bayes denoiser of a finite data set, as a network (InfoNoise paper, App. A.2 and D.1).

Under the empirical prior p(x0) = (1/N) Σ_i δ(x0 - x_i) and the channel x = x0 + σε, the posterior puts weight
w_i(x; σ) = softmax_i(-‖x - x_i‖²/(2σ²)) on each data point (Eqs. 31 and 54), and the Bayes denoiser is the
posterior mean D*(x; σ) = Σ_i w_i x_i (Eq. 32). Its mean squared error, averaged over x0 drawn from the data and
over the noise, is the exact mmse(σ) of the data set, so the offline-profile code of `diagnose.py` turns it
into the exact entropy-rate profile r = mmse/σ³ (Eq. 11).

`EmpiricalBayesDenoiser` has the attributes and call signature of EDM's preconditioned networks, so the offline
profile and EDM's samplers (`training.sampling`) take it in place of a trained network. It works in float64 and
evaluates the weights in log space (D.1): distances come from one matrix product, ‖x‖² + ‖x_i‖² - 2xᵀx_i, and the
softmax runs over the data in chunks with a running maximum (the streaming form of logsumexp), so memory stays at
[batch, chunk_size] however large the data set.
"""

import torch


class EmpiricalBayesDenoiser(torch.nn.Module):
    """D*(x; σ) = Σ_i softmax_i(-‖x - x_i‖²/(2σ²)) x_i over the images `data` [N, C, H, W] (float, EDM's [-1, 1])."""

    def __init__(self, data: torch.Tensor, chunk_size: int = 4096):
        super().__init__()
        if data.ndim != 4 or data.shape[0] < 1 or data.shape[2] != data.shape[3]:
            raise ValueError(f'Need square images [N, C, H, W] with N >= 1, got shape {tuple(data.shape)}')
        if chunk_size < 1:
            raise ValueError(f'chunk_size must be positive, got {chunk_size}')
        flat = data.reshape(data.shape[0], -1).to(torch.float64)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError('The data set has non-finite values')
        self.img_channels = int(data.shape[1])
        self.img_resolution = int(data.shape[2])
        self.label_dim = 0
        self.sigma_min = 0
        self.sigma_max = float('inf')
        self.chunk_size = int(chunk_size)
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

        `class_labels` and other keyword arguments are accepted for the samplers' sake and ignored: the prior is
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
        scale = (0.5 / sigma.square()).expand(flat.shape[0])[:, None]  # 1/(2σ²) per row.
        x_sq = flat.square().sum(1, keepdim=True)

        # Online softmax over data chunks: running max m, normaliser s = Σ e^{l - m} and numerator Σ e^{l - m} x_i.
        running_max = torch.full([flat.shape[0], 1], -torch.inf, dtype=torch.float64, device=flat.device)
        normaliser = torch.zeros_like(running_max)
        numerator = torch.zeros_like(flat)
        for start in range(0, self.num_images, self.chunk_size):
            chunk = self.data[start : start + self.chunk_size]
            sq_dist = (x_sq + self.data_sq[start : start + self.chunk_size] - 2 * flat @ chunk.T).clamp(min=0)
            logits = -sq_dist * scale
            new_max = torch.maximum(running_max, logits.amax(1, keepdim=True))
            rescale = torch.exp(running_max - new_max)  # exp(-inf) = 0 on the first chunk.
            weights = torch.exp(logits - new_max)
            normaliser = normaliser * rescale + weights.sum(1, keepdim=True)
            numerator = numerator * rescale + weights @ chunk
            running_max = new_max
        return (numerator / normaliser).reshape(x.shape)


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
