"""The training loop: EDM's order of operations (Karras et al. 2022, training/training_loop.py) with σ drawn from a
pluggable noise sampler that observes every step's per-sample denoising error (InfoNoise paper, Algorithm 1).

Exact resume: every step reseeds torch's RNG from (seed, rank, images seen) and the data order is a random-access
function of the global image position, so a run resumed from a training state draws exactly what the
uninterrupted run would have drawn. A run also resumes from EDM's own state dump as EDM does: network and Adam state
from `training-state-NNNNNN.pt`, the EMA from the `network-snapshot-NNNNNN.pkl` beside it, NNNNNN kimg done (read
without running the code these pickles embed); EDM saves no noise sampler state, so the noise sampler starts fresh.
"""

import copy
import dataclasses
import json
import math
import os
import time

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc, training_stats
from training import checkpoint, live_log, phema, sampling
from training import run_dir as rundir


def step_seed(seed: int, rank: int, nimg: int) -> int:
    """Seed of the step that starts after `nimg` images on `rank` (edm2-style derived per-step seeds)."""
    return int(np.random.SeedSequence([seed % 2**32, rank, nimg]).generate_state(1)[0])


def split_batch(batch_size: int, batch_gpu: int | None, world: int) -> tuple[int, int, int]:
    """Images per rank per step, per forward pass (at most `batch_gpu`) and the number of accumulation rounds."""
    batch_gpu_total = batch_size // world
    if batch_gpu_total < 1:
        raise ValueError(f'Batch size {batch_size} is not divisible by {world} ranks: fewer images than ranks')
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    rounds = batch_gpu_total // batch_gpu
    if batch_size != batch_gpu * rounds * world:
        raise ValueError(f'Batch size {batch_size} is not divisible by {world} ranks × batch-gpu {batch_gpu}')
    return batch_gpu_total, batch_gpu, rounds


@torch.no_grad()
def update_ema(ema, net, cur_nimg: int, batch_size: int, halflife_kimg: float, rampup_ratio: float | None) -> None:
    """EDM's EMA: half-life `halflife_kimg`, ramped up to `rampup_ratio` × images seen so far."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    beta = 0.5 ** (batch_size / max(halflife_nimg, 1e-8))
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p_net.detach().lerp(p_ema, beta))


def status_line(tick: int, nimg: int, total_nimg: float, timing: dict, loss: float, sampler: str, device) -> str:
    """EDM's tick line plus the loss, the time left at this tick's speed (from the second tick of a launch on: the
    first includes start-up) and the noise sampler's state; every number is also reported to training_stats."""
    report0 = training_stats.report0
    speed = timing['tick_nimg'] / max(timing['tick_sec'], 1e-8)
    left = '-' if timing['first'] else dnnlib.util.format_time(report0('Timing/left_sec', (total_nimg - nimg) / speed))
    fields = [
        f'tick {report0("Progress/tick", tick):<5d}',
        f'kimg {report0("Progress/kimg", nimg / 1e3):<9.3f}',
        f'time {dnnlib.util.format_time(report0("Timing/total_sec", timing["total_sec"])):<12s}',
        f'left {left:<12s}',
        f'sec/tick {report0("Timing/sec_per_tick", timing["tick_sec"]):<7.1f}',
        f'sec/kimg {report0("Timing/sec_per_kimg", 1e3 / speed):<7.2f}',
        f'img/s {report0("Timing/img_per_sec", speed):<8.1f}',
        f'maintenance {report0("Timing/maintenance_sec", timing["maintenance_sec"]):<6.1f}',
        f'loss {loss:<8.4g}',
        *([sampler] if sampler else []),
        f'cpumem {report0("Resources/cpu_mem_gb", psutil.Process(os.getpid()).memory_info().rss / 2**30):<6.2f}',
    ]
    if device.type == 'cuda':
        fields.append(
            f'gpumem {report0("Resources/peak_gpu_mem_gb", torch.cuda.max_memory_allocated(device) / 2**30):<6.2f}'
        )
        fields.append(
            f'reserved {report0("Resources/peak_gpu_mem_reserved_gb", torch.cuda.max_memory_reserved(device) / 2**30):<6.2f}'
        )
        torch.cuda.reset_peak_memory_stats()
    return ' '.join(fields)


def event_record(event) -> dict | str:
    """A noise sampler event as JSON-ready data: a dataclass's fields (NaN as null), else its text."""
    if not dataclasses.is_dataclass(event):
        return str(event)
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in dataclasses.asdict(event).items()}


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
    ema_profiles=None,  # Post-hoc EMA (EDM2): σ_rel of each power-function EMA profile to track, None = none.
    ema_profile_every=None,  # How often to store those profiles (whole kimg), None = with each network snapshot.
    lr_rampup_kimg=10000,  # Learning rate ramp-up duration.
    loss_scaling=1,  # Loss scaling factor for reducing FP16 under/overflows.
    kimg_per_tick=50,  # Interval of progress prints.
    snapshot_ticks=50,  # How often to save network snapshots, None = disable.
    state_dump_ticks=500,  # How often to dump training state, None = disable.
    snapshot_grid=0,  # Images in the sample grid saved with each snapshot, 0 = none.
    snapshot_grid_scale=1,  # Enlargement of each image in that grid.
    verbose=False,  # Print every event of the noise sampler (InfoNoise's refresh checks); stats.jsonl has them all.
    tensorboard=False,  # Also write each tick's statistics as TensorBoard events into run_dir (rank 0)?
    transfer=None,  # Network to initialise from (our snapshot or an EDM pickle), None = none.
    resume_state=None,  # Training state to resume from, None = start fresh.
    bf16=False,  # Run the network under bfloat16 autocast?
    compile=False,  # Wrap the network in torch.compile?
    cudnn_benchmark=True,  # Enable torch.backends.cudnn.benchmark?
    device=torch.device('cuda'),  # Device to train on.
    stop_signals=None,  # dist.StopSignals asking to stop cleanly (SIGTERM/SIGINT), None = never stop early.
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
    batch_gpu_total, batch_gpu, num_accumulation_rounds = split_batch(batch_size, batch_gpu, world)

    # Say first whether and when the noise sampler can adapt in this run; keep its events for stats.jsonl.
    noise_sampler = dnnlib.util.construct_class_by_name(**noise_kwargs)
    for line in noise_sampler.schedule_report(total_kimg * 1000, batch_size):
        dist.print0(line)
    events = []
    noise_sampler.callback = lambda event: (events.append(event), verbose and dist.print0(str(event)))

    # Load dataset.
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)

    # Construct network.
    dist.print0('Constructing network...')
    net_kwargs = dict(network_kwargs, img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels,
                      label_dim=dataset_obj.label_dim)  # fmt: skip
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
        source = checkpoint.load_network(transfer)
        misc.copy_params_and_buffers(src_module=source.net, dst_module=net, require_all=False)
        misc.copy_params_and_buffers(src_module=source.net, dst_module=ema, require_all=False)
        del source

    # Resume training state, inside the tick it was saved in (a state saved on a stop signal is mid-tick).
    cur_nimg = cur_tick = tick_start_nimg = 0
    if resume_state is not None:
        dist.print0(f'Loading training state from "{resume_state}"...')
        state = checkpoint.restore(resume_state, net_kwargs, noise_kwargs, net, ema, optimizer, noise_sampler)
        cur_nimg = int(state['cur_nimg'])
        cur_tick, tick_start_nimg = int(state.get('cur_tick', 0)), int(state.get('tick_start_nimg', cur_nimg))
    timed_from_nimg = cur_nimg  # A tick's speed counts the images this launch trained in it (a resumed tick: fewer).

    # Post-hoc EMA profiles, continued from the training state when it tracked the same σ_rel values.
    profiles = phema.PowerFunctionEMA(net, ema_profiles) if ema_profiles else None
    if profiles is not None and resume_state is not None:
        if state.get('phema') is not None and state['phema']['sigma_rels'] == profiles.sigma_rels:
            profiles.load_state_dict(state['phema'])
        else:
            dist.print0(f'The training state tracks no post-hoc EMA profiles of σ_rel {profiles.sigma_rels}: they '
                        'start from the resumed weights, as if those had been the weights since the first step.')  # fmt: skip

    # Distribute and optionally compile the network that takes gradient steps.
    ddp = net
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
    train_net = torch.compile(ddp) if compile else ddp

    # Data order continues at the global image position where the resumed run stopped.
    dataset_sampler = misc.InfiniteSampler(dataset_obj, rank=rank, num_replicas=world, seed=seed, start_idx=cur_nimg)
    loader = torch.utils.data.DataLoader(
        dataset_obj, sampler=dataset_sampler, batch_size=batch_gpu, **data_loader_kwargs
    )
    dataset_iterator = iter(loader)
    pixels_per_image = math.prod(net.img_shape)

    # Train.
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0()
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    first_tick = True
    stats_jsonl = None
    tick_loss = training_stats.Collector(regex='Loss/loss')  # The loss over each tick, for the status line.
    sigma_bin_loss = live_log.SigmaBinLoss(device)
    tensorboard_log = live_log.TensorBoardLog(run_dir) if tensorboard and rank == 0 else None

    def save_state() -> None:  # On every rank: each rank's noise sampler state is its own (InfoNoise bins its losses).
        sampler_ranks = dist.all_gather_object(noise_sampler.state_dict()) if world > 1 else None
        if rank == 0:
            checkpoint.save_training_state(
                run_dir, cur_nimg, net, ema, optimizer, noise_sampler, noise_sampler_ranks=sampler_ranks,
                network_kwargs=net_kwargs, noise_kwargs=noise_kwargs, loss_kwargs=loss_kwargs,
                dataset_kwargs=dataset_kwargs, augment_kwargs=augment_kwargs, optimizer_kwargs=optimizer_kwargs,
                seed=seed, cur_tick=cur_tick, tick_start_nimg=tick_start_nimg,
                **({} if profiles is None else dict(phema=profiles.state_dict())),
            )  # fmt: skip

    def save_profiles() -> None:  # On every rank (the consistency check is collective); rank 0 writes.
        for ema_copy in profiles.emas:
            misc.check_ddp_consistency(ema_copy)
        profile = noise_sampler.profile()
        if rank == 0:
            checkpoint.save_phema(
                run_dir, cur_nimg, net_kwargs, profiles.profiles(), None if profile is None else profile.to_dict(),
                loss_kwargs=loss_kwargs, noise_kwargs=noise_kwargs, augment_kwargs=augment_kwargs,
                dataset_kwargs=dataset_kwargs,
            )  # fmt: skip

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
                importance = noise_sampler.importance(sigma)  # Under the law that drew σ, before `observe`.
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss, mse = loss_fn(
                        net=train_net, images=images, sigma=sigma, labels=labels, augment_pipe=augment_pipe
                    )
                loss = loss if importance is None else loss * importance
                noise_sampler.observe(sigma, mse.detach())
                training_stats.report('Loss/loss', loss)
                sigma_bin_loss.add(sigma, loss)
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
        update_ema(ema, net, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio)
        if profiles is not None:
            profiles.update(net, cur_nimg + batch_size, batch_size)  # Time t of Eq. 127: images seen after the step.

        # Store the post-hoc EMA profiles at every multiple of ema_profile_every, whatever the ticks.
        cur_nimg += batch_size
        done = cur_nimg >= total_kimg * 1000
        if profiles is not None and ema_profile_every is not None:
            every = ema_profile_every * 1000  # Whole kimg: one file per kimg name at most.
            if done or cur_nimg // every > (cur_nimg - batch_size) // every:
                save_profiles()

        # Perform maintenance tasks once per tick.
        stop = stop_signals.poll() if stop_signals is not None else 0
        saved = False
        if done or cur_tick == 0 or cur_nimg >= tick_start_nimg + kimg_per_tick * 1000:
            # Print status line, accumulating the same information in training_stats.
            tick_end_time = time.time()
            tick_loss.update()
            timing = dict(total_sec=tick_end_time - start_time, tick_sec=tick_end_time - tick_start_time,
                          tick_nimg=max(cur_nimg - timed_from_nimg, 1), maintenance_sec=maintenance_time,
                          first=first_tick)  # fmt: skip
            dist.print0(status_line(cur_tick, cur_nimg, total_kimg * 1000, timing, tick_loss.mean('Loss/loss'),
                                    noise_sampler.summary(), device))  # fmt: skip
            for name, value in noise_sampler.describe().items():
                training_stats.report0(f'Noise/{name}', value)
            training_stats.report0('Progress/lr', lr)
            sigma_bin_loss.report()

            # Save network snapshot.
            if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
                misc.check_ddp_consistency(ema)
                profile = noise_sampler.profile()
                profile = None if profile is None else profile.to_dict()
                if rank == 0:
                    checkpoint.save_snapshot(
                        run_dir, cur_nimg, net_kwargs, ema, profile, loss_kwargs=loss_kwargs, noise_kwargs=noise_kwargs,
                        augment_kwargs=augment_kwargs, dataset_kwargs=dataset_kwargs,
                    )  # fmt: skip
                    if snapshot_grid:
                        grid_path = rundir.path(run_dir, 'samples', cur_nimg)
                        sampling.save_snapshot_grid(ema, snapshot_grid, grid_path, device, snapshot_grid_scale)
                if profiles is not None and ema_profile_every is None:
                    save_profiles()

            # Update logs before the state dump, so that a run stopped in between measures this tick again.
            training_stats.default_collector.update()
            if rank == 0:
                stats_jsonl = stats_jsonl or open(os.path.join(run_dir, rundir.STATS), 'a')
                line = dict(training_stats.default_collector.as_dict(), timestamp=time.time())
                line.update({'Noise/events': [event_record(event) for event in events]} if events else {})
                stats_jsonl.write(json.dumps(line) + '\n')
                stats_jsonl.flush()
                if tensorboard_log is not None:
                    tensorboard_log.tick(line, cur_nimg, events, noise_sampler)
            events.clear()

            # Update state, then save a full dump of it.
            dump = state_dump_ticks is not None and (done or cur_tick % state_dump_ticks == 0) and cur_tick != 0
            cur_tick += 1
            tick_start_nimg = timed_from_nimg = cur_nimg
            if dump:
                misc.check_ddp_consistency(net)
                save_state()
                saved = True
            tick_start_time = time.time()
            maintenance_time = tick_start_time - tick_end_time
            first_tick = False

        # Stop on a signal: save the state at this step (mid-tick, unless the tick just saved it) and leave the loop.
        if stop and not done:
            if not saved:
                save_state()
            dist.print0(f'Stopped at {cur_nimg / 1e3:g} kimg; training state saved. Resume with --resume=auto.')
        if done or stop:
            break

    # Done.
    if stats_jsonl is not None:
        stats_jsonl.close()
    if tensorboard_log is not None:
        tensorboard_log.close()
    dist.print0()
    dist.print0('Exiting...')
    return dnnlib.EasyDict(net=net, ema=ema, noise_sampler=noise_sampler, cur_nimg=cur_nimg, stopped=stop,
                           phema=profiles)  # fmt: skip
