"""Generate images with a trained network, as EDM's generate.py (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models").

One PNG per seed, drawn with EDM's sampler (Algorithm 2) on EDM's rho-grid. Every seed has its own random
generator, so an image depends only on its seed. Under torchrun the seeds are split across ranks as EDM does.
"""

import os

import click
import numpy as np
import PIL.Image
import torch
import tqdm

from dnnlib.util import parse_int_list
from infonoise.grids import edm_grid
from torch_utils import distributed as dist
from torch_utils.persistence import load_network
from training.sampling import StackedRandomGenerator, edm_sampler, images_to_uint8, save_image, tile_images


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    """Where the image of `seed` goes: outdir/{seed:06d}.png, or one subdirectory per 1000 seeds."""
    image_dir = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(image_dir, f'{seed:06d}.png')


def split_seeds(seeds: list[int], max_batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches, as EDM: the seeds split into a multiple of world_size near-equal batches, rank r
    taking batches r, r + W, ... (some may be empty)."""
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    all_batches = torch.as_tensor(seeds).tensor_split(num_batches)
    return [batch.tolist() for batch in all_batches[rank::world_size]]


def save_grid_png(outdir: str, seeds: list[int], subdirs: bool, grid_png: str) -> None:
    """Tile the saved images of `seeds`, read back from disk (so every rank's images are included), into one PNG."""
    images = np.stack([np.array(PIL.Image.open(image_path(outdir, seed, subdirs))) for seed in seeds])
    images = images.reshape(*images.shape[:3], -1)
    os.makedirs(os.path.dirname(grid_png) or '.', exist_ok=True)
    save_image(tile_images(images), grid_png)


POSITIVE = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE = click.FloatRange(min=0)
POSITIVE_INT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)


@click.command(context_settings={'show_default': True})
@click.option('--network', 'network_pkl', help='Network snapshot or EDM pickle', metavar='PATH|URL', required=True)
@click.option('--outdir', help='Where to save the output images', metavar='DIR', required=True)
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', type=parse_int_list, default='0-63')
@click.option('--subdirs', help='Create subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=NON_NEGATIVE_INT)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=POSITIVE_INT, default=64)
# Sampler options.
@click.option('--steps', 'num_steps', help='Number of sampling steps', metavar='INT', type=POSITIVE_INT, default=18)
@click.option('--sigma_min', help='Lowest noise level  [default: 0.002]', metavar='FLOAT', type=POSITIVE)
@click.option('--sigma_max', help='Highest noise level  [default: 80]', metavar='FLOAT', type=POSITIVE)
@click.option('--rho', help='Time step exponent', metavar='FLOAT', type=POSITIVE, default=7)
@click.option('--S_churn', 'S_churn', help='Stochasticity strength', metavar='FLOAT', type=NON_NEGATIVE, default=0)
@click.option('--S_min', 'S_min', help='Stoch. min noise level', metavar='FLOAT', type=NON_NEGATIVE, default=0)
@click.option('--S_max', 'S_max', help='Stoch. max noise level', metavar='FLOAT', type=NON_NEGATIVE, default='inf')
@click.option('--S_noise', 'S_noise', help='Stoch. noise inflation', metavar='FLOAT', type=float, default=1)
@click.option('--solver', help='ODE solver', type=click.Choice(['heun', 'euler']), default='heun')
# Other options.
@click.option('--device', help='Device  [default: cuda if available, else cpu]', type=click.Choice(['cuda', 'cpu']))
@click.option('--grid-png', 'grid_png', help='Also save all images as one PNG grid', metavar='FILE')
def main(
    network_pkl,
    outdir,
    seeds,
    subdirs,
    class_idx,
    max_batch_size,
    num_steps,
    sigma_min,
    sigma_max,
    rho,
    solver,
    device,
    grid_png,
    **churn_kwargs,
):
    """Generate random images using the techniques described in the paper
    "Elucidating the Design Space of Diffusion-Based Generative Models".

    Examples:

    \b
    # Generate 64 images and save them as out/*.png
    python generate.py --outdir=out --seeds=0-63 --batch=64 \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    \b
    # Generate 16 images on the CPU and also tile them into one PNG
    python generate.py --outdir=out --seeds=0-15 --device=cpu --grid-png=out/grid.png \\
        --network=network-snapshot-000100.pt

    \b
    # Generate 1024 images using 2 GPUs
    torchrun --standalone --nproc_per_node=2 generate.py --outdir=out --seeds=0-1023 --batch=64 \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    The noise range [sigma_min, sigma_max] is always clamped to the range the network supports, as in EDM.
    """
    try:
        device = dist.init(device)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None

    # Rank 0 goes first, so that a download lands in the cache once.
    if dist.get_rank() != 0:
        dist.barrier()
    dist.print0(f'Loading network from "{network_pkl}"...')
    try:
        net = load_network(network_pkl, device=device).net
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if dist.get_rank() == 0:
        dist.barrier()

    # Check the class label against the network.
    if class_idx is not None and not net.label_dim:
        raise click.ClickException('--class given, but the network is unconditional')
    if class_idx is not None and class_idx >= net.label_dim:
        raise click.ClickException(f'--class={class_idx} is out of range; the network has {net.label_dim} classes')

    # Build the sigma-grid within the range the network supports (as EDM, user values are clamped too).
    sigma_min = max(0.002 if sigma_min is None else sigma_min, float(net.sigma_min))
    sigma_max = min(80.0 if sigma_max is None else sigma_max, float(net.sigma_max))
    if sigma_min >= sigma_max:
        raise click.ClickException(
            f'Empty noise range for this network: sigma_min={sigma_min:g} >= sigma_max={sigma_max:g}'
        )
    sigmas = edm_grid(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)

    # Loop over batches.
    dist.print0(f'Generating {len(seeds)} images to "{outdir}" ({solver}, {num_steps} steps)...')
    rank_batches = split_seeds(seeds, max_batch_size, dist.get_rank(), dist.get_world_size())
    for batch_seeds in tqdm.tqdm(rank_batches, unit='batch', disable=(dist.get_rank() != 0)):
        dist.barrier()
        batch_size = len(batch_seeds)
        if batch_size == 0:
            continue

        # Pick latents and labels; labels are drawn even with --class, so that later noise matches EDM's.
        rnd = StackedRandomGenerator(device, batch_seeds)
        latents = rnd.randn([batch_size, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        class_labels = None
        if net.label_dim:
            labels = rnd.randint(net.label_dim, size=[batch_size], device=device)
            class_labels = torch.eye(net.label_dim, device=device)[labels]
        if class_idx is not None:
            class_labels[:, :] = 0
            class_labels[:, class_idx] = 1

        # Generate and save images.
        images = edm_sampler(
            net, latents, sigmas, class_labels, randn_like=rnd.randn_like, solver=solver, **churn_kwargs
        )
        for seed, image in zip(batch_seeds, images_to_uint8(images)):
            path = image_path(outdir, seed, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_image(image, path)

    # Done.
    dist.barrier()
    if grid_png is not None and dist.get_rank() == 0:
        save_grid_png(outdir, seeds, subdirs, grid_png)
        dist.print0(f'Saved image grid to "{grid_png}"')
    dist.print0('Done.')
    dist.shutdown()


if __name__ == '__main__':
    main()
