"""The run directory: the one place that knows what a training run writes and under which names.

EDM's layout: OUTDIR/NNNNN-DESC/ with `training_options.json`, `log.txt`, `stats.jsonl` and, per kimg done,
`network-snapshot-NNNNNN.pt` (EDM: `.pkl`), `training-state-NNNNNN.pt`; ours adds `profile-NNNNNN.json/.png`,
`samples-NNNNNN.png` and, with --ema-profiles, `phema-NNNNNN.pt` (post-hoc EMA profiles, training/phema.py). NNNNNN grows a digit past 999,999 kimg, so files are ordered by number, never by name.

A run directory belongs to one process at a time: `lock` holds an exclusive lock for the life of the process, so a
second launch (a requeued job while the first still runs) says who holds it and trains nothing.
"""

import fcntl
import json
import os
import re
import socket
import time

import torch

import dnnlib

OPTIONS = 'training_options.json'
LOG = 'log.txt'
STATS = 'stats.jsonl'
LOCK = '.lock'
KINDS = {'network-snapshot': 'pt', 'training-state': 'pt', 'profile': 'json', 'samples': 'png', 'phema': 'pt'}


def path(run_dir: str, kind: str, nimg: int, ext: str | None = None) -> str:
    """RUN_DIR/KIND-NNNNNN.EXT for `nimg` images done (NNNNNN = kimg, EDM's naming)."""
    return os.path.join(run_dir, f'{kind}-{nimg // 1000:06d}.{ext or KINDS[kind]}')


def kimg_of(file: str, kind: str, ext: str | None = None) -> int | None:
    """The kimg in the name of a run directory's file of `kind` (e.g. 12 for training-state-000012.pt), or None."""
    match = re.fullmatch(rf'{re.escape(kind)}-(\d+)\.{re.escape(ext or KINDS[kind])}', os.path.basename(file))
    return int(match.group(1)) if match else None


def find(run_dir: str, kind: str, ext: str | None = None) -> dict[int, str]:
    """kimg -> path of the run directory's files of `kind` (e.g. find(run, 'network-snapshot')), in kimg order."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    found = {kimg: os.path.join(run_dir, name) for name in names if (kimg := kimg_of(name, kind, ext)) is not None}
    return dict(sorted(found.items()))


def newest(run_dir: str, kind: str) -> str | None:
    """The file of `kind` with the most kimg, or None."""
    found = find(run_dir, kind)
    return found[max(found)] if found else None


def holds_run(run_dir: str) -> bool:
    """Whether a folder holds (part of) a training run: its options, or any file a run writes."""
    if not os.path.isdir(run_dir):
        return False
    names = set(os.listdir(run_dir))
    return bool(names & {OPTIONS, LOG, STATS}) or any(find(run_dir, kind) for kind in KINDS)


def read_options(run_dir: str) -> dict:
    """The run's training_options.json; ValueError (one line) for a missing, unreadable or malformed file."""
    file = os.path.join(run_dir, OPTIONS)
    if not os.path.isfile(file):
        raise ValueError(f'{run_dir} holds a run but no {OPTIONS}')
    options = dnnlib.util.read_json(file)
    if not isinstance(options, dict):
        raise ValueError(f'"{file}" must hold a JSON object of training options')
    options['noise_kwargs'] = upgrade_noise_kwargs(options.get('noise_kwargs'))
    return options


def upgrade_noise_kwargs(noise_kwargs):
    """Noise-sampler settings of an older run with the keys it lacks set to what it ran with: InfoNoise before
    `build` existed drew from the paper's law ('paper'), so such a run continues unchanged (or is told to pass
    --info-build=paper) instead of switching law."""
    if isinstance(noise_kwargs, dict) and noise_kwargs.get('class_name') == 'infonoise.InfoNoise':
        return {**noise_kwargs, 'build': noise_kwargs.get('build', 'paper')}
    return noise_kwargs


def next_id_dir(outdir: str, desc: str) -> str:
    """OUTDIR/NNNNN-DESC with NNNNN one above the highest run id in `outdir` (EDM's numbering)."""
    names = [x for x in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, x))] if os.path.isdir(outdir) else []
    ids = [int(m.group()) for m in (re.match(r'^\d+', x) for x in names) if m is not None]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def create(outdir: str, desc: str) -> str:
    """Create the next run directory exclusively: a job that lists `outdir` at the same time as another and loses the
    race to create the directory takes the next id, so two runs never share one."""
    os.makedirs(outdir, exist_ok=True)
    while True:
        run_dir = next_id_dir(outdir, desc)
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:
            continue


def newest_of(outdir: str, desc: str) -> str | None:
    """The run directory of OUTDIR named NNNNN-DESC with the highest id, or None; a '*' in DESC stands for any number
    (train.py's 'gpus*': a run continues on another number of GPUs)."""
    pattern = re.escape(desc).replace(r'\*', r'\d+')
    names = os.listdir(outdir) if os.path.isdir(outdir) else []
    runs = [x for x in names if re.fullmatch(rf'\d+-{pattern}', x)]
    return os.path.join(outdir, max(runs, key=lambda x: int(x.split('-')[0]))) if runs else None


class Busy(RuntimeError):
    """The run directory is locked by another live process."""


def lock(lock_file: str, what: str) -> int:
    """Take the exclusive lock `lock_file` for the life of this process (the kernel drops it when the process ends,
    however it ends) and record the holder in it; returns the file descriptor. Busy, naming the holder, if another
    process has it. The file stays: removing it would let a third process lock a fresh file beside a live holder."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors='replace').strip() or 'another process'
        os.close(fd)
        raise Busy(f'{what} is in use by {holder}; wait for it to end, or stop it first') from None
    started = time.strftime('%Y-%m-%d %H:%M:%S')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()} (since {started})\n'.encode(), 0)
    return fd


def state_nimg(state_path: str) -> int:
    """Images done at a training state: our state's exact count (read lazily, without loading its tensors), or the
    kimg in the name of EDM's."""
    try:
        return int(torch.load(state_path, map_location='cpu', weights_only=True, mmap=True)['cur_nimg'])
    except Exception:  # EDM's pickled dumps: NNNNNN kimg done.
        return (kimg_of(state_path, 'training-state') or 0) * 1000


def trim_stats(run_dir: str, nimg: int) -> None:
    """Continuing a run in place from `nimg` images: keep the stats.jsonl lines of the ticks up to it and drop those
    of the stopped attempt after it (they are measured again), so the file holds each tick once, in order."""
    file = os.path.join(run_dir, STATS)
    if not os.path.isfile(file):
        return
    keep = []
    with open(file, encoding='utf-8') as f:
        for line in f:
            try:
                if round(json.loads(line)['Progress/kimg']['mean'] * 1000) > nimg:
                    break
            except (json.JSONDecodeError, RecursionError, KeyError, TypeError):
                break  # A line cut short by the stop.
            keep.append(line)
    with dnnlib.util.atomic_write(file, 'w', encoding='utf-8') as f:
        f.writelines(keep)


def plain(value):
    """A config value as JSON sees it (tuples as lists, EasyDicts as dicts), for comparisons."""
    return json.loads(json.dumps(value))


def same_config(a, b) -> bool:
    return plain(a) == plain(b)


def config_differences(old: dict, new: dict, prefix: str = '') -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for each leaf of two nested configs that differs, in key order."""
    found = []
    for key in sorted({*old, *new}):
        a, b = plain(old.get(key)), plain(new.get(key))
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, f'{prefix}{key}.')
        elif a != b:
            found.append((prefix + key, a, b))
    return found
