"""Denoising score-matching loss at given noise levels (EDM, Karras et al. 2022, Eq. 2 and Table 1).

The loss does not draw σ: the training loop asks a noise sampler (infonoise.samplers) for σ and passes it in.
What remains is EDM's loss body: augment, add noise, denoise, and weight the squared error by λ(σ). The loss
weight is chosen independently of the noise sampler (`weight`), so that InfoNoise can divide it out (paper Eq. 16).
With `learned_uncertainty` the network also returns EDM2's log-variance u(σ) and the loss becomes
w(σ)·mse/e^u + u (`infonoise.uncertainty`; InfoNoise still divides out only the static w).
"""

import torch

from infonoise.uncertainty import uncertainty_objective
from infonoise.weights import WEIGHTS


class DenoisingLoss:
    """λ(σ)·‖D(y + n; σ) − y‖² with y the (augmented) clean image and n ~ N(0, σ²I).

    Returns the weighted per-sample loss and the raw per-sample MSE, both [N] and both means over pixels; the
    training loop multiplies by the pixel count so that gradients equal EDM's sum over elements.
    """

    def __init__(self, weight: str = 'edm', sigma_data: float = 0.5, learned_uncertainty: bool = False):
        if weight not in WEIGHTS:
            raise ValueError(f'Unknown loss weight "{weight}"; choose from {", ".join(WEIGHTS)}')
        self.weight_name = weight
        self.sigma_data = float(sigma_data)
        self.learned_uncertainty = bool(learned_uncertainty)  # The net has uncertainty_channels > 0.

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return WEIGHTS[self.weight_name](sigma, self.sigma_data)

    def __call__(self, net, images, sigma, labels=None, augment_pipe=None):
        # Same RNG order as EDM after σ: augmentation draws, then the noise.
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        n = torch.randn_like(y) * sigma
        if self.learned_uncertainty:
            D_yn, u = net(y + n, sigma, labels, augment_labels=augment_labels, return_logvar=True)
        else:
            D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        mse = (D_yn.to(torch.float32) - y).square().flatten(1).mean(dim=1)
        loss = self.weight(sigma.flatten()) * mse
        return (uncertainty_objective(loss, u) if self.learned_uncertainty else loss), mse
