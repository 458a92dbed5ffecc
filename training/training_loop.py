"""The training loop: EDM's order of operations (Karras et al. 2022, training/training_loop.py) with σ drawn from a
pluggable noise sampler that observes every step's per-sample denoising error (InfoNoise paper, Algorithm 1).

Exact resume: every step reseeds torch's RNG from (seed, rank, images seen) and the data order is a random-access
function of the global image position, so a run resumed from a training state draws exactly what the
uninterrupted run would have drawn. A run also resumes from EDM's own state dump as EDM does: network and Adam state
from `training-state-NNNNNN.pt`, the EMA from the `network-snapshot-NNNNNN.pkl` beside it, NNNNNN kimg done (read
without running the code these pickles embed); EDM saves no noise sampler state, so the sampler starts fresh.
"""

import copy
import json
import math
import os
import pickle
import re
import time

import numpy as np
import psutil
import torch

import dnnlib
from infonoise import plots
from infonoise.profile import Profile
from torch_utils import distributed as dist
from torch_utils import misc, persistence, training_stats

SNAPSHOT_FORMAT = 'infonoise-edm-snapshot'
STATE_FORMAT = 'infonoise-edm-training-state'


def step_seed(seed: int, rank: int, nimg: int) -> int:
    """Seed of the step that starts after `nimg` images on `rank` (edm2-style derived per-step seeds)."""
    return int(np.random.SeedSequence([seed % 2**32, rank, nimg]).generate_state(1)[0])


def cpu_state_dict(module: torch.nn.Module) -> dict:
    """A module's state dict as detached CPU tensors, for snapshots and training states."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def load_edm_training_state(path: str, network_kwargs: dict) -> dict:
    """EDM's state dump plus the EMA of the snapshot beside it, as the fields of our training state (EDM's resume)."""
    edm = persistence.load_edm_training_state(path)
    match = re.fullmatch(r'training-state-(\d+)\.pt', os.path.basename(path))
    if match is None:
        raise ValueError(f'EDM training state "{path}" must be named training-state-<kimg>.pt (EDM resumes there)')
    snapshot_path = os.path.join(os.path.dirname(path), f'network-snapshot-{match.group(1)}.pkl')
    if not os.path.isfile(snapshot_path):
        raise ValueError(f'EDM training state "{path}" needs its EMA from "{snapshot_path}", which does not exist')
    snapshot = persistence.load_network(snapshot_path)
    written = {
        f'EDM training state "{path}"': edm.network_kwargs,
        f'EDM snapshot "{snapshot_path}"': snapshot.network_kwargs,
    }
    for name, kwargs in written.items():
        if kwargs != network_kwargs:
            raise ValueError(f'{name} was written for a different network: {kwargs}')
    return dict(
        network_kwargs=edm.network_kwargs,
        net=edm.net,
        ema=cpu_state_dict(snapshot.net),
        optimizer=edm.optimizer_state,
        noise_sampler=None,
        cur_nimg=int(match.group(1)) * 1000,
        seed=None,
    )


def load_training_state(path: str, network_kwargs: dict, noise_kwargs: dict) -> dict:
    """Read our training state, or EDM's, and check that it was written for this network (and noise sampler).

    EDM's states give `noise_sampler=None` and `seed=None`: it saves neither.
    """
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        state = None  # Pickled objects, as in EDM's state dumps.
    except Exception as e:
        raise ValueError(f'Cannot read training state "{path}": {e}') from None
    if state is None:
        return load_edm_training_state(path, network_kwargs)
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise ValueError(f'"{path}" is not an InfoNoise-EDM training state')
    if state['network_kwargs'] != network_kwargs:
        raise ValueError(f'Training state "{path}" was written for a different network: {state["network_kwargs"]}')
    if state['noise_kwargs']['class_name'] != noise_kwargs['class_name']:
        raise ValueError(
            f'Training state "{path}" was written with the noise sampler {state["noise_kwargs"]["class_name"]}'
        )
    return state


def training_loop(
    *,
    run_dir='.',  # Output directory.
    dataset_kwargs,  # Options for the training set.
    data_loader_kwargs,  # Options for torch.utils.data.DataLoader.
    network_kwargs,  # Options for the model and its preconditioning.
    loss_kwargs,  # Options for the loss function.
    noise_kwargs,  # Options for the noise sampler that draws σ.
    optimizer_kwargs,  # Options for the optimizer.
    augment_kwargs=None,  # Options for the augmentation pipeline, None = disable.
    seed=0,  # Global random seed.
    batch_size=512,  # Total batch size for one training iteration.
    batch_gpu=None,  # Limit batch size per device, None = no limit.
    total_kimg=200000,  # Training duration, measured in thousands of training images.
    ema_halflife_kimg=500,  # Half-life of the exponential moving average (EMA) of model weights.
    ema_rampup_ratio=0.05,  # EMA ramp-up coefficient, None = no ramp-up.
    lr_rampup_kimg=10000,  # Learning rate ramp-up duration.
    loss_scaling=1,  # Loss scaling factor for reducing FP16 under/overflows.
    kimg_per_tick=50,  # Interval of progress prints.
    snapshot_ticks=50,  # How often to save network snapshots, None = disable.
    state_dump_ticks=500,  # How often to dump training state, None = disable.
    transfer=None,  # Network to initialise from (our snapshot or an EDM pickle), None = none.
    resume_state=None,  # Training state to resume from, None = start fresh.
    bf16=False,  # Run the network under bfloat16 autocast?
    compile=False,  # Wrap the network in torch.compile?
    cudnn_benchmark=True,  # Enable torch.backends.cudnn.benchmark?
    device=torch.device('cuda'),  # Device to train on.
):
    # Initialise.
    start_time = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    np.random.seed((seed * world + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    # Select batch size per device.
    batch_gpu_total = batch_size // world
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    num_accumulation_rounds = batch_gpu_total // batch_gpu
    if batch_size != batch_gpu * num_accumulation_rounds * world:
        raise ValueError(f'Batch size {batch_size} is not divisible by {world} ranks × batch-gpu {batch_gpu}')

    # Say first whether and when the noise sampler can adapt in this run, and report each refresh check.
    noise_sampler = dnnlib.util.construct_class_by_name(**noise_kwargs)
    for line in noise_sampler.schedule_report(total_kimg * 1000, batch_size):
        dist.print0(line)
    noise_sampler.callback = lambda event: dist.print0(str(event))

    # Load dataset.
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)

    # Construct network.
    dist.print0('Constructing network...')
    net_kwargs = dict(
        network_kwargs,
        img_resolution=dataset_obj.resolution,
        img_channels=dataset_obj.num_channels,
        label_dim=dataset_obj.label_dim,
    )
    net = dnnlib.util.construct_class_by_name(**net_kwargs)
    net.train().requires_grad_(True).to(device)
    if rank == 0:
        with torch.no_grad():
            images = torch.zeros([batch_gpu, *net.img_shape], device=device)
            sigma = torch.ones([batch_gpu], device=device)
            labels = torch.zeros([batch_gpu, net.label_dim], device=device)
            misc.print_module_summary(net, [images, sigma, labels], max_nesting=2)

    # Set up loss, optimizer and augmentation.
    dist.print0('Setting up optimizer...')
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    ema = copy.deepcopy(net).eval().requires_grad_(False)

    # Transfer weights from another network.
    if transfer is not None:
        dist.print0(f'Loading network weights from "{transfer}"...')
        source = persistence.load_network(transfer)
        misc.copy_params_and_buffers(src_module=source.net, dst_module=net, require_all=False)
        misc.copy_params_and_buffers(src_module=source.net, dst_module=ema, require_all=False)
        del source

    # Resume training state.
    cur_nimg = 0
    if resume_state is not None:
        dist.print0(f'Loading training state from "{resume_state}"...')
        state = load_training_state(resume_state, net_kwargs, noise_kwargs)
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        optimizer.load_state_dict(state['optimizer'])
        if state['noise_sampler'] is not None:
            noise_sampler.load_state_dict(state['noise_sampler'])
        else:
            dist.print0('The training state holds no noise sampler state (EDM saves none); the sampler starts fresh.')
        cur_nimg = int(state['cur_nimg'])
        del state

    # Distribute and optionally compile the network that takes gradient steps.
    ddp = net
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
    train_net = torch.compile(ddp) if compile else ddp

    # Data order continues at the global image position where the resumed run stopped.
    dataset_sampler = misc.InfiniteSampler(
        dataset=dataset_obj, rank=rank, num_replicas=world, seed=seed, start_idx=cur_nimg
    )
    dataset_iterator = iter(
        torch.utils.data.DataLoader(
            dataset=dataset_obj, sampler=dataset_sampler, batch_size=batch_gpu, **data_loader_kwargs
        )
    )
    pixels_per_image = math.prod(net.img_shape)

    # Train.
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0()
    cur_tick = 0
    tick_start_nimg = cur_nimg
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    stats_jsonl = None
    tick_loss = training_stats.Collector(regex='Loss/loss')  # The loss over each tick, for the status line.
    while True:
        # Reseed so that a resumed run draws the same σ, noise, augmentation and dropout.
        torch.manual_seed(step_seed(seed, rank, cur_nimg))

        # Accumulate gradients.
        optimizer.zero_grad(set_to_none=True)
        for round_idx in range(num_accumulation_rounds):
            with misc.ddp_sync(ddp, (round_idx == num_accumulation_rounds - 1)):
                images, labels = next(dataset_iterator)
                images = images.to(device).to(torch.float32) / 127.5 - 1
                labels = labels.to(device)
                sigma = noise_sampler.sample(images.shape[0], device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss, mse = loss_fn(
                        net=train_net, images=images, sigma=sigma, labels=labels, augment_pipe=augment_pipe
                    )
                noise_sampler.observe(sigma, mse.detach())
                training_stats.report('Loss/loss', loss)
                # Pixel sum averaged over this rank's batch, as EDM.
                loss.sum().mul(loss_scaling * pixels_per_image / batch_gpu_total).backward()

        # Update weights.
        lr = optimizer_kwargs['lr'] * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
        for g in optimizer.param_groups:
            g['lr'] = lr
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()

        # Update EMA.
        ema_halflife_nimg = ema_halflife_kimg * 1000
        if ema_rampup_ratio is not None:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
        ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))

        # Perform maintenance tasks once per tick.
        cur_nimg += batch_size
        done = cur_nimg >= total_kimg * 1000
        if (not done) and (cur_tick != 0) and (cur_nimg < tick_start_nimg + kimg_per_tick * 1000):
            continue

        # Print status line, accumulating the same information in training_stats.
        tick_end_time = time.time()
        tick_sec = tick_end_time - tick_start_time
        tick_nimg = max(cur_nimg - tick_start_nimg, 1)
        fields = []
        fields += [f'tick {training_stats.report0("Progress/tick", cur_tick):<5d}']
        fields += [f'kimg {training_stats.report0("Progress/kimg", cur_nimg / 1e3):<9.3f}']
        fields += [
            f'time {dnnlib.util.format_time(training_stats.report0("Timing/total_sec", tick_end_time - start_time)):<12s}'
        ]
        fields += [f'sec/tick {training_stats.report0("Timing/sec_per_tick", tick_sec):<7.1f}']
        fields += [f'sec/kimg {training_stats.report0("Timing/sec_per_kimg", tick_sec / tick_nimg * 1e3):<7.2f}']
        fields += [f'img/s {training_stats.report0("Timing/img_per_sec", tick_nimg / max(tick_sec, 1e-8)):<8.1f}']
        fields += [f'maintenance {training_stats.report0("Timing/maintenance_sec", maintenance_time):<6.1f}']
        tick_loss.update()
        fields += [f'loss {tick_loss.mean("Loss/loss"):<8.4g}']
        fields += [noise_sampler.summary()] if noise_sampler.summary() else []
        fields += [
            f'cpumem {training_stats.report0("Resources/cpu_mem_gb", psutil.Process(os.getpid()).memory_info().rss / 2**30):<6.2f}'
        ]
        if device.type == 'cuda':
            fields += [
                f'gpumem {training_stats.report0("Resources/peak_gpu_mem_gb", torch.cuda.max_memory_allocated(device) / 2**30):<6.2f}'
            ]
            fields += [
                f'reserved {training_stats.report0("Resources/peak_gpu_mem_reserved_gb", torch.cuda.max_memory_reserved(device) / 2**30):<6.2f}'
            ]
            torch.cuda.reset_peak_memory_stats()
        dist.print0(' '.join(fields))
        for name, value in noise_sampler.describe().items():
            training_stats.report0(f'Noise/{name}', value)

        # Save network snapshot.
        if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
            misc.check_ddp_consistency(ema)
            profile = noise_sampler.profile()
            if rank == 0:
                snapshot = dict(
                    format=SNAPSHOT_FORMAT,
                    version=1,
                    network_kwargs=net_kwargs,
                    ema=cpu_state_dict(ema),
                    loss_kwargs=dict(loss_kwargs),
                    noise_kwargs=dict(noise_kwargs),
                    augment_kwargs=dict(augment_kwargs) if augment_kwargs is not None else None,
                    dataset_kwargs=dict(dataset_kwargs),
                    kimg=cur_nimg // 1000,
                    profile=profile,
                )
                persistence.save_atomic(snapshot, os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}.pt'))
                if profile is not None:
                    # The profile also as JSON, which `generate.py --grid=infogrid --profile=FILE` reads.
                    profile_path = os.path.join(run_dir, f'profile-{cur_nimg // 1000:06d}')
                    plots.save_profile_plot(Profile.from_dict(profile), profile_path + '.png')
                    with open(profile_path + '.json', 'w', encoding='utf-8') as f:
                        json.dump(profile, f)

        # Save full dump of the training state.
        if state_dump_ticks is not None and (done or cur_tick % state_dump_ticks == 0) and cur_tick != 0:
            misc.check_ddp_consistency(net)
            if rank == 0:
                state = dict(
                    format=STATE_FORMAT,
                    version=1,
                    network_kwargs=net_kwargs,
                    net=cpu_state_dict(net),
                    ema=cpu_state_dict(ema),
                    optimizer=optimizer.state_dict(),
                    noise_kwargs=dict(noise_kwargs),
                    noise_sampler=noise_sampler.state_dict(),
                    cur_nimg=cur_nimg,
                    seed=seed,
                    dataset_kwargs=dict(dataset_kwargs),
                )
                persistence.save_atomic(state, os.path.join(run_dir, f'training-state-{cur_nimg // 1000:06d}.pt'))

        # Update logs.
        training_stats.default_collector.update()
        if rank == 0:
            if stats_jsonl is None:
                stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'a')
            stats_jsonl.write(
                json.dumps(dict(training_stats.default_collector.as_dict(), timestamp=time.time())) + '\n'
            )
            stats_jsonl.flush()

        # Update state.
        cur_tick += 1
        tick_start_nimg = cur_nimg
        tick_start_time = time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    # Done.
    if stats_jsonl is not None:
        stats_jsonl.close()
    dist.print0()
    dist.print0('Exiting...')
    return dnnlib.EasyDict(net=net, ema=ema, noise_sampler=noise_sampler, cur_nimg=cur_nimg)
