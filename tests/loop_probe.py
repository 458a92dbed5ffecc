"""Probes and an oracle for the training-loop tests.

`record_steps` records what the optimizer sees at the first steps of a run (global optimizer hooks, so the loop stays
untouched; also inside torchrun ranks, see ddp_worker.py); `record_restore` the noise sampler state just after a
resume loaded it. `edm_gradients` recomputes the gradient of one training step without the loop, in one process and
one backward pass over the whole global batch, and `adam_step` is Adam written out (Kingma & Ba 2015, Algorithm 1).
"""

import contextlib
import copy
import inspect
import itertools

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import dnnlib
from torch_utils import misc
from training import checkpoint
from training.training_loop import step_seed


@contextlib.contextmanager
def record_steps(limit: int = 2):
    """Yield a list that receives, for each of the first `limit` optimizer steps of any optimizer: the learning rate,
    the parameters before and after the step, the gradients as the optimizer sees them (after DDP's all-reduce and
    the loop's sanitising) and Adam's moments and step count after it."""
    records = []

    def params_of(optimizer):
        return [p for group in optimizer.param_groups for p in group['params']]

    def pre(optimizer, args, kwargs):
        if len(records) < limit:
            params = params_of(optimizer)
            records.append(
                dict(
                    lr=optimizer.param_groups[0]['lr'],
                    before=[p.detach().clone() for p in params],
                    grad=[None if p.grad is None else p.grad.clone() for p in params],
                )
            )

    def post(optimizer, args, kwargs):
        if records and 'after' not in records[-1]:
            params = params_of(optimizer)
            records[-1]['after'] = [p.detach().clone() for p in params]
            for name in ('exp_avg', 'exp_avg_sq', 'step'):
                records[-1][name] = [optimizer.state[p][name].clone() for p in params]

    handles = [
        register_optimizer_step_pre_hook(pre),
        register_optimizer_step_post_hook(post),
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def record_restore():
    """Yield a dict that receives the noise sampler's state_dict() just after `checkpoint.restore` loaded it."""
    found = {}
    original = checkpoint.restore

    def restore(*args, **kwargs):
        fields = original(*args, **kwargs)
        sampler = inspect.signature(original).bind(*args, **kwargs).arguments['noise_sampler']
        found['noise_sampler'] = copy.deepcopy(sampler.state_dict())  # It may share tensors with the sampler.
        return fields

    checkpoint.restore = restore
    try:
        yield found
    finally:
        checkpoint.restore = original


def construct_network(c: dict, dataset):
    """The network of config `c` for `dataset`, as the loop builds it (training mode)."""
    kwargs = dict(c['network_kwargs'], img_resolution=dataset.resolution, img_channels=dataset.num_channels,
                  label_dim=dataset.label_dim)  # fmt: skip
    return dnnlib.util.construct_class_by_name(**kwargs).train().requires_grad_(True)


def edm_gradients(c: dict, params: list, world: int, nimg: int, sampler_state: dict | None = None) -> list:
    """The gradient at parameters `params` of the training step that starts after `nimg` images of a `world`-rank run
    with config `c` (the loop's keyword arguments), computed in ONE process with ONE backward pass.

    The global batch is the union of the ranks' batches. Rank r's images sit at the global data positions
    nimg + r, nimg + r + world, ... (EDM's InfiniteSampler interleaves ranks); its σ, augmentation, noise and dropout
    are drawn after torch.manual_seed(step_seed(seed, r, nimg)) in the loop's order (per forward pass of `batch_gpu`
    images: σ from the noise sampler, then the augmentation, then n ~ N(0, σ²I), then the network's dropout). The
    loss is EDM's: Σ_i λ(σ_i) Σ_pixels (D(y_i + n_i; σ_i) − y_i)² / batch_size, with the EDM weight
    λ(σ) = (σ² + σ_data²) / (σ·σ_data)² — a sum over pixels and a mean over the whole batch (over a rank's images,
    then over ranks)."""
    dataset = dnnlib.util.construct_class_by_name(**c['dataset_kwargs'])
    net = construct_network(c, dataset)
    with torch.no_grad():
        for p, value in zip(net.parameters(), params, strict=True):
            p.copy_(value)
    sampler = dnnlib.util.construct_class_by_name(**c['noise_kwargs'])
    if sampler_state is not None:
        sampler.load_state_dict(sampler_state)
    augment_pipe = dnnlib.util.construct_class_by_name(**c['augment_kwargs']) if c.get('augment_kwargs') else None
    assert c['loss_kwargs']['weight'] == 'edm'
    sigma_data = c['loss_kwargs']['sigma_data']
    per_rank = c['batch_size'] // world
    batch_gpu = min(c['batch_gpu'] or per_rank, per_rank)
    terms = []
    for rank in range(world):
        order = misc.InfiniteSampler(dataset, rank=rank, num_replicas=world, seed=c['seed'], start_idx=nimg)
        indices = list(itertools.islice(iter(order), per_rank))
        torch.manual_seed(step_seed(c['seed'], rank, nimg))
        for start in range(0, per_rank, batch_gpu):
            images, labels = torch.utils.data.default_collate([dataset[i] for i in indices[start : start + batch_gpu]])
            images = images.to(torch.float32) / 127.5 - 1
            sigma = sampler.sample(len(images), 'cpu')
            y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
            n = torch.randn_like(y) * sigma[:, None, None, None]
            D = net(y + n, sigma, labels, augment_labels=augment_labels)
            weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
            terms.append(weight * (D - y).square().sum(dim=(1, 2, 3)))
    loss = torch.cat(terms).sum() / c['batch_size']
    loss.backward()
    return [p.grad for p in net.parameters()]


def adam_step(p, g, m, v, t: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """Adam's step number t (1-based) in float64: the new parameter and moments (Kingma & Ba 2015, Algorithm 1)."""
    p, g, m, v = (x.double() for x in (p, g, m, v))
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return p, m, v
