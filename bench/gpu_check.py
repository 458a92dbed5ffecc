"""One command that proves the CUDA paths work, in at most about 8 minutes on one GPU.

Checks, each 'ok', 'FAIL' or 'skipped: why':
(a) step time of one training step (σ draw, EDM loss, backward, Adam) of the CIFAR-10 DDPM++ network of
    configs/cifar10-uncond-ddpmpp.json (EDM config F, 56 M parameters, 32x32, batch 64, synthetic data) in fp32,
    bf16 autocast (train.py --bf16), fp16 (EDM's --fp16, CUDA only), channels_last and torch.compile, each as a ratio
    to fp32 measured in the same run;
(b) bf16 against fp32 from the same initial weights and the same σ and noise: the loss of each of the first steps
    agrees within BF16_TOLERANCE (relative); the weights EDM initialises to (nearly) zero (output layers) get small
    random values first, as otherwise the network's output is 0 and the loss would not see its arithmetic;
(c) generate.py twice with the same seeds on the device (per-seed torch generators there): identical images;
(d) `torchrun --standalone --nproc_per_node=1 train.py` for two steps of a small network: the process group is
    NCCL on CUDA (gloo on CPU, torch_utils/distributed.py), and the run must finish with a snapshot.

--quick runs the same checks on the CPU at toy size (a 0.1 M-parameter network at 8x8), skipping the ones that
need CUDA (fp16, torch.compile's kernels) with a 'skipped: no CUDA' line; tests/test_gpu_check.py runs it. Prints a
table and writes OUTDIR/gpu_check.json. Exit status 1 if any check failed.

    python -m bench.gpu_check --outdir=bench-out/gpu-check          # on a GPU machine
    python -m bench.gpu_check --quick --outdir=/tmp/gpu-check       # anywhere, in under a minute
"""

import copy
import os
import subprocess
import sys
import time
import zipfile

import click
import numpy as np
import PIL.Image
import torch

import dnnlib
from bench.common import REPO_ROOT, markdown_table, run_record, sync, write_json
from infonoise.samplers import LogNormal
from training import checkpoint, options
from training.loss import DenoisingLoss

BF16_TOLERANCE = 0.01  # Largest relative difference of a step's loss between bf16 autocast and fp32.
FULL = dict(
    resolution=32, batch=64, warmup=5, steps=20, loss_steps=5, net=dict(options.ARCH_KWARGS['ddpmpp'], dropout=0)
)
QUICK = dict(resolution=8, batch=8, warmup=1, steps=3, loss_steps=3,
             net=dict(options.ARCH_KWARGS['ddpmpp'], model_channels=16, channel_mult=[1, 2], num_blocks=1,
                      attn_resolutions=[4], dropout=0))  # fmt: skip
SMALL_TRAIN_ARGS = ['--cbase=16', '--cres=1,2', '--blocks=1', '--attn=4']


def build_net(size: dict, device: torch.device, use_fp16: bool = False) -> torch.nn.Module:
    """The check's network (fixed init: seed 0), on `device`, in train mode."""
    torch.manual_seed(0)
    kwargs = dict(size['net'], class_name='training.networks.EDMPrecond', use_fp16=use_fp16)
    net = dnnlib.util.construct_class_by_name(**kwargs, img_resolution=size['resolution'], img_channels=3, label_dim=0)
    return net.train().requires_grad_(True).to(device)


def train_steps(net, images: torch.Tensor, steps: int, dtype: torch.dtype | None, seed: int = 0) -> list[torch.Tensor]:
    """`steps` training steps, each seeded by (seed + step) so that two networks see the same σ and noise; the mean
    loss of each step (on the device: no sync)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn, sampler = DenoisingLoss(weight='edm'), LogNormal()
    losses = []
    for step in range(steps):
        torch.manual_seed(seed + step)
        optimizer.zero_grad(set_to_none=True)
        sigma = sampler.sample(images.shape[0], images.device)
        with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _mse = loss_fn(net=net, images=images, sigma=sigma)
        loss.mean().backward()
        optimizer.step()
        losses.append(loss.detach().mean())
    return losses


def time_variant(size: dict, device: torch.device, variant: str) -> dict:
    """Seconds per training step of one variant (after warm-up steps; torch.compile's compile time apart)."""
    net = build_net(size, device, use_fp16=variant == 'fp16')
    images = torch.randn([size['batch'], 3, size['resolution'], size['resolution']], device=device)
    if variant == 'channels_last':
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if variant == 'compile':
        net = torch.compile(net)
    dtype = torch.bfloat16 if variant == 'bf16' else None
    start = time.perf_counter()
    train_steps(net, images, size['warmup'], dtype)
    sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    losses = train_steps(net, images, size['steps'], dtype, seed=100)
    sync(device)
    seconds = (time.perf_counter() - start) / size['steps']
    finite = bool(torch.isfinite(torch.stack(losses)).all())
    return dict(sec_per_step=seconds, warmup_sec=warmup, finite=finite)


def guarded(check: str, fn, *args) -> dict:
    """`fn(*args)`, or a failed check naming the exception (a crash or a timeout fails one check, not the run)."""
    try:
        return fn(*args)
    except Exception as e:
        return dict(check=check, status='FAIL', detail=f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:200]}')


def check_step_times(size: dict, device: torch.device) -> list[dict]:
    rows = []
    for variant in ('fp32', 'bf16', 'fp16', 'channels_last', 'compile'):
        name = f'step time {variant}'
        if variant in ('fp16', 'compile') and device.type != 'cuda':
            rows.append(dict(check=name, status='skipped: no CUDA'))
            continue
        try:
            result = time_variant(size, device, variant)
        except Exception as e:  # A check that crashes is a failed check; the others still run.
            rows.append(dict(check=name, status='FAIL', detail=f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'))
            continue
        fp32 = rows[0].get('sec_per_step') if rows else result['sec_per_step']
        result['ratio_to_fp32'] = result['sec_per_step'] / fp32 if fp32 else None
        ok = result['finite']
        ratio = result['ratio_to_fp32']
        detail = f'{result["sec_per_step"] * 1e3:.1f} ms/step, ' + (f'{ratio:.2f}x fp32' if ratio else 'fp32 failed')
        if variant == 'compile':
            detail += f' (compile + warm-up {result["warmup_sec"]:.0f} s)'
        rows.append(dict(check=name, status='ok' if ok else 'FAIL: non-finite loss', detail=detail, **result))
    return rows


def check_bf16_loss(size: dict, device: torch.device) -> dict:
    images = torch.randn([size['batch'], 3, size['resolution'], size['resolution']], device=device,
                         generator=torch.Generator(device).manual_seed(1))  # fmt: skip
    net = build_net(size, device)
    with torch.no_grad():  # EDM initialises the output layers to (nearly) zero: F ~ 0 would hide the arithmetic.
        generator = torch.Generator(device).manual_seed(2)
        for param in net.parameters():
            if param.ndim > 1 and float(param.abs().max()) < 1e-3:
                param.normal_(0, 0.05, generator=generator)
    net_bf16 = copy.deepcopy(net)
    fp32 = torch.stack(train_steps(net, images, size['loss_steps'], None)).double().cpu()
    bf16 = torch.stack(train_steps(net_bf16, images, size['loss_steps'], torch.bfloat16)).double().cpu()
    rel = float(((bf16 - fp32).abs() / fp32.abs()).max())
    ok = rel <= BF16_TOLERANCE
    detail = f'max relative loss difference {rel:.2e} over {size["loss_steps"]} steps (tolerance {BF16_TOLERANCE})'
    return dict(check='bf16 loss vs fp32', status='ok' if ok else 'FAIL', detail=detail, max_rel_diff=rel,
                fp32_losses=fp32.tolist(), bf16_losses=bf16.tolist())  # fmt: skip


def run(args: list[str], cwd: str = REPO_ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def failure(check: str, proc: subprocess.CompletedProcess) -> dict:
    lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    return dict(check=check, status='FAIL', detail=f'exit {proc.returncode}: {lines[-1] if lines else ""}'[:300])


def check_generate_seeds(size: dict, device: torch.device, workdir: str) -> dict:
    net = build_net(size, device).eval()
    net_kwargs = dict(size['net'], class_name='training.networks.EDMPrecond', use_fp16=False,
                      img_resolution=size['resolution'], img_channels=3, label_dim=0)  # fmt: skip
    checkpoint.save_snapshot(workdir, 0, net_kwargs, net, None)
    snapshot = os.path.join(workdir, 'network-snapshot-000000.pt')
    arrays = []
    for run_idx in range(2):
        npz = os.path.join(workdir, f'generate-{run_idx}.npz')
        proc = run([sys.executable, 'generate.py', f'--network={snapshot}', f'--outdir={workdir}/gen-{run_idx}',
                    '--seeds=0-7', '--batch=4', '--steps=6', f'--device={device.type}', f'--npz={npz}'])  # fmt: skip
        if proc.returncode != 0:
            return failure('generate.py seeds', proc)
        with np.load(npz) as data:
            arrays.append(data['arr_0'])
    same = np.array_equal(arrays[0], arrays[1])
    detail = f'8 seeds, two runs on {device.type}: ' + ('identical' if same else 'DIFFERENT')
    return dict(check='generate.py seeds', status='ok' if same else 'FAIL', detail=detail)


def write_dataset(path: str, resolution: int, count: int = 64) -> str:
    """`count` random RGB images as an EDM-style zip of PNGs (unconditional)."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, 'w') as zf:
        for i in range(count):
            image = rng.integers(0, 256, [resolution, resolution, 3], dtype=np.uint8)
            with zf.open(f'{i // 1000:05d}/img{i:08d}.png', 'w') as f:
                PIL.Image.fromarray(image).save(f, format='png')
    return path


def check_torchrun(size: dict, device: torch.device, workdir: str) -> dict:
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    check = f'torchrun train.py ({backend})'
    data = write_dataset(os.path.join(workdir, 'data.zip'), size['resolution'])
    attn = '--attn=4' if size['resolution'] == 8 else '--attn=16'
    # 1 kimg is train.py's shortest run: 2 steps of 512 images.
    args = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', 'train.py',
            f'--outdir={workdir}/runs', f'--data={data}', f'--device={device.type}', '--workers=0', '--batch=512',
            '--batch-gpu=128', '--duration=0.001', '--tick=1', '--seed=0', *SMALL_TRAIN_ARGS[:3], attn]  # fmt: skip
    proc = run(args, timeout=420)
    if proc.returncode != 0:
        return failure(check, proc)
    snapshots = [name for d in os.listdir(f'{workdir}/runs') for name in os.listdir(f'{workdir}/runs/{d}')
                 if name.startswith('network-snapshot-')]  # fmt: skip
    ok = bool(snapshots)
    return dict(check=check, status='ok' if ok else 'FAIL: no snapshot', detail='2 steps of batch 512, snapshot saved')


@click.command()
@click.option(
    '--outdir', help='Where to write gpu_check.json', metavar='DIR', default='bench-out/gpu-check', show_default=True
)
@click.option('--quick', help='Toy size on the CPU (CUDA-only checks skipped); the test suite runs it', is_flag=True)
def main(outdir: str, quick: bool):
    """Prove the CUDA paths: precisions, channels_last, torch.compile, seeds, torchrun with NCCL."""
    start = time.time()
    device = torch.device('cuda' if torch.cuda.is_available() and not quick else 'cpu')
    size = QUICK if quick else FULL
    os.makedirs(outdir, exist_ok=True)
    print(
        f'Device: {torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}, torch {torch.__version__}'
    )
    torch.backends.cudnn.benchmark = True  # As training_loop does: cuDNN autotuning, no TF32 in "fp32".
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rows = check_step_times(size, device)
    rows.append(guarded('bf16 loss vs fp32', check_bf16_loss, size, device))
    rows.append(guarded('generate.py seeds', check_generate_seeds, size, device, outdir))
    rows.append(guarded('torchrun train.py', check_torchrun, size, device, outdir))
    print(markdown_table(['check', 'status', 'detail'], [[r['check'], r['status'], r.get('detail', '')] for r in rows]))
    failed = [r['check'] for r in rows if r['status'].startswith('FAIL')]
    record = dict(run_record('bench.gpu_check', start, device), quick=quick, bf16_tolerance=BF16_TOLERANCE,
                  checks=rows, failed=failed)  # fmt: skip
    write_json(os.path.join(outdir, 'gpu_check.json'), record)
    print(f'{len(rows) - len(failed)} of {len(rows)} checks passed or skipped in {time.time() - start:.0f} s; '
          f'{os.path.join(outdir, "gpu_check.json")}')  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
