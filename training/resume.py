"""Continuing a run: which training state or run directory a launch continues, what must match for it to do so, and
the lock that keeps two launches from training into one run directory.

Every refusal is a ValueError of one line that names the options that differ and both values, through `flags`, a
map from config keys (dotted, or their last part) to the command-line options that set them.
"""

import json
import os

import dnnlib
from training import checkpoint, run_dir

# What --resume=auto may change when it continues a run: where it restarts from, how long it runs, how it loads data,
# how often it reports and saves; none changes what the run computes. A new seed is refused on its own.
AUTO_RESUME_FREE = ('run_dir', 'resume_state', 'seed', 'total_kimg', 'data_loader_kwargs', 'cudnn_benchmark',
                    'kimg_per_tick', 'snapshot_ticks', 'state_dump_ticks', 'snapshot_grid', 'snapshot_grid_scale',
                    'verbose', 'tensorboard', 'ema_profile_every')  # fmt: skip


def differences(old: dict, new: dict, groups, flags: dict[str, str]) -> list[str]:
    """'--flag: OLD (now NEW; config.key)' for each entry of the config `groups` (top-level keys) that differs."""
    found = []
    for key, a, b in run_dir.config_differences({k: old.get(k) for k in groups}, {k: new.get(k) for k in groups}):
        flag = flags.get(key) or flags.get(key.split('.')[-1]) or key
        found.append(f'{flag}: {json.dumps(a)} (now {json.dumps(b)}{"" if flag == key else f"; {key}"})')
    return found


def find_state(path: str) -> str:
    """A training-state-*.pt file (ours or EDM's), or the newest one in a run directory."""
    if os.path.isdir(path):
        if (state := run_dir.newest(path, 'training-state')) is None:
            raise ValueError(f'--resume: no training-state-*.pt in "{path}"')
        return state
    if not os.path.isfile(path):
        raise ValueError(f'--resume: no such file or directory "{path}"')
    return path


def check_state(c: dnnlib.EasyDict, net_kwargs: dict, strict: bool, flags: dict[str, str]) -> None:
    """Check that c.resume_state fits the config `c`: the same network, and the same data, loss and noise sampler
    unless not `strict` (--allow-changes); finite numbers; a state the noise sampler can load. Take its seed (none
    for EDM's states: random, as EDM) if `c` has none."""
    try:
        state = checkpoint.load_training_state(c.resume_state, None)
    except (OSError, ValueError) as e:
        raise ValueError(f'--resume: {e}') from None
    real = lambda kwargs: dict(kwargs or {}, path=os.path.realpath(str((kwargs or {}).get('path'))))  # noqa: E731
    old = dict(state, dataset_kwargs=dict(real(state.get('dataset_kwargs')), cache=c.dataset_kwargs.cache))
    new = dict(c, network_kwargs=net_kwargs, dataset_kwargs=real(c.dataset_kwargs))
    groups = ['network_kwargs'] + [
        k for k in ('dataset_kwargs', 'loss_kwargs', 'noise_kwargs') if strict and k in state
    ]
    if changed := differences(old, new, groups, flags):
        raise ValueError(
            f'--resume: {c.resume_state} was trained with other options: {"; ".join(changed)}. Start from its '
            'weights with --transfer' + ('' if 'network_kwargs' in changed[0] else ', or continue with --allow-changes')
        )
    if state['noise_sampler'] is not None and run_dir.same_config(state.get('noise_kwargs'), c.noise_kwargs):
        try:
            dnnlib.util.construct_class_by_name(**c.noise_kwargs).load_state_dict(state['noise_sampler'])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f'--resume: {c.resume_state}: cannot restore the noise sampler: {e}') from None
    if c.seed is None:
        c.seed = state['seed']


def find_run(c: dnnlib.EasyDict, directory: str | None, seed: int | None, flags: dict[str, str]) -> None:
    """--resume=auto: continue `directory` (the command's newest run, or OUTDIR itself with --nosubdir) if it holds
    one: set c.run_dir, c.seed to the run's and c.resume_state to its newest training state (none if it stopped
    before its first). A run started with other options, or another `seed`, is refused, not mixed in; so is a folder
    that holds run files but no training_options.json."""
    if directory is None or not run_dir.holds_run(directory):
        return
    try:
        old = run_dir.read_options(directory)
    except (OSError, ValueError) as e:
        raise ValueError(f'--resume=auto: {e}; restore it, or use another --outdir') from None
    changed = differences(old, run_dir.plain(c), sorted({*old, *c} - set(AUTO_RESUME_FREE)), flags)
    if seed is not None and seed != old.get('seed'):
        changed.append(f'--seed: {old.get("seed")} (now {seed})')
    if changed:
        raise ValueError(
            f'--resume=auto: {directory} was started with other options: {"; ".join(changed)}. Rerun its command, '
            'or start another run with --desc'
        )
    c.run_dir, c.seed = directory, old.get('seed')
    if (state := run_dir.newest(directory, 'training-state')) is not None:
        c.resume_state = os.path.abspath(state)


def claim(
    c: dnnlib.EasyDict, outdir: str, desc: str, auto: str | None, flags: dict[str, str], locks: list[int]
) -> bool:
    """Lock the run directory for this process (creating a new numbered OUTDIR/NNNNN-DESC if c.run_dir is None); say
    whether the run is new. A --resume=auto launch (`auto`: the run name it continues, see run_dir.newest_of) also
    holds OUTDIR/.AUTO.lock while it finds or creates its run, so that two launches of one command never train side
    by side, and what it found before must still hold. The descriptors of the locks go to `locks`: closing them
    releases the locks."""
    if auto is not None and c.run_dir != outdir:
        os.makedirs(outdir, exist_ok=True)
        name = auto.replace('*', 'N')
        locks.append(run_dir.lock(os.path.join(outdir, f'.{name}.lock'), f'--resume=auto of "{name}"'))
        found = dnnlib.EasyDict(c, run_dir=None, resume_state=None)
        find_run(found, run_dir.newest_of(outdir, auto), None, flags)
        if (found.run_dir, found.resume_state) != (c.run_dir, c.get('resume_state')):
            raise ValueError(f'--resume=auto: {outdir} changed while this launch started; relaunch it')
    new_run = c.run_dir is None or not run_dir.holds_run(c.run_dir)
    if c.run_dir is None:
        c.run_dir = run_dir.create(outdir, desc)
    os.makedirs(c.run_dir, exist_ok=True)
    locks.append(run_dir.lock(os.path.join(c.run_dir, run_dir.LOCK), f'Run directory {c.run_dir}'))
    return new_run
