"""InfoNoise's saved state: what `InfoNoise.state_dict` writes, and the checks before `load_state_dict` restores it.

The state (Algorithm 1's buffers, counts, loss EMA and table, plus counters) is a plain dict for
torch.load(weights_only=True), so a file that is damaged, hand-edited or written for another configuration would
otherwise load and train on quietly: buffers of the wrong size, pointers outside the ring buffers, NaN in the loss
EMA, a CDF table that is not a CDF. `check_state` refuses each with a ValueError naming the field and what is
wrong, before anything is loaded.
"""

import math
import numbers
from typing import Any

import torch

from infonoise.pivot import DEBOUNCE
from infonoise.profile import Profile
from infonoise.table import InverseCDFTable, LogLinearTable

# Keys of `InfoNoise.state_dict()`; 'next_check_nimg' is the older name of 'next_check'.
REQUIRED = ('buffer', 'ptr', 'count', 'nonfinite', 'mse', 'nimg', 'refreshes', 'pivot', 'table', 'profile')


def _fail(field: str, problem: str) -> None:
    raise ValueError(f'InfoNoise state: {field} {problem}')


def _tensor(state: dict, field: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    value = state[field]
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) != shape:
        got = f'{value.dtype} {tuple(value.shape)}' if isinstance(value, torch.Tensor) else type(value).__name__
        _fail(field, f"must be a {dtype} tensor of shape {shape} (this sampler's configuration), got {got}")
    return value


def _number(state: dict, field: str, integer: bool = False) -> float:
    value = state[field]
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not 0 <= value < math.inf:
        _fail(field, f'must be {"an integer" if integer else "a finite number"} >= 0, got {value!r}')
    return value


# The saved form of each table: its tensors, the points they hang on, and how many points K bins give.
TABLES = {'paper': (('sigma', 'cdf'), 'sigma', 0), 'continuous': (('log_sigma', 'density', 'cdf'), 'log_sigma', 2)}


def _check_table(table: Any, num_bins: int, build: str) -> None:
    keys, points_key, extra = TABLES[build]
    if not isinstance(table, dict) or set(table) != set(keys):
        # The usual cause: a state written by the other build (states before `build` existed are 'paper').
        _fail('table', f'must be None or a dict of {", ".join(keys)} (build={build!r}; the state holds {sorted(table)})'
              if isinstance(table, dict) else 'must be None or a dict')  # fmt: skip
    for key in keys:
        _tensor(table, key, (num_bins + extra,), torch.float64)
    points, cdf = table[points_key], table['cdf']
    if not bool(torch.isfinite(points).all() & (points[1:] > points[:-1]).all()) or (
        points_key == 'sigma' and not bool((points > 0).all())
    ):
        _fail(f'table.{points_key}', 'must be finite, strictly increasing (and σ positive)')
    if 'density' in table and not bool(torch.isfinite(table['density']).all() & (table['density'] >= 0).all()):
        _fail('table.density', 'must be finite and >= 0')
    if not bool(torch.isfinite(cdf).all() & (cdf[1:] >= cdf[:-1]).all()) or cdf[0] != 0 or abs(cdf[-1] - 1) > 1e-9:
        _fail('table.cdf', 'must be a CDF: finite, non-decreasing, from 0 to 1')


def check_state(state: Any, num_bins: int, buffer_size: int, in_steps: bool, build: str = 'paper') -> None:
    """Raise ValueError (one line, naming the field) unless `state` is an InfoNoise state for K = `num_bins`
    intervals of B = `buffer_size` losses, durations counted in steps if `in_steps` (else images), whose table has
    the form of `build` (`infonoise.law`): required keys,
    tensor shapes and dtypes, finite values where they must be, ring-buffer pointers and counts within [0, B], a
    monotone CDF table, and refreshes, table, profile and pivot that agree (a table and a profile exist exactly
    when a refresh happened)."""
    if not isinstance(state, dict):
        raise ValueError(f'InfoNoise state must be a dict, got {type(state).__name__}')
    missing = [key for key in REQUIRED if key not in state]
    if 'next_check' not in state and 'next_check_nimg' not in state:
        missing.append('next_check')
    if missing:
        raise ValueError(f'InfoNoise state lacks {", ".join(missing)}')
    K, B = num_bins, buffer_size
    buffer = state['buffer']
    if isinstance(buffer, torch.Tensor) and tuple(buffer.shape) != (K, B + 1):
        # The usual cause: another number of intervals K or buffer size B than the run that wrote the state.
        raise ValueError(
            f'InfoNoise state has buffers {tuple(buffer.shape)}, expected {(K, B + 1)} (K intervals, B + 1)'
        )
    if not bool(torch.isfinite(_tensor(state, 'buffer', (K, B + 1), torch.float32)).all()):
        _fail('buffer', 'holds non-finite losses')
    ptr, count = _tensor(state, 'ptr', (K,), torch.int64), _tensor(state, 'count', (K,), torch.int64)
    if not bool(((ptr >= 0) & (ptr < B)).all()):
        _fail('ptr', f'must lie in [0, {B})')
    if not bool(((count >= 0) & (count <= B)).all()):
        _fail('count', f'must lie in [0, {B}]')
    if _tensor(state, 'nonfinite', (), torch.int64) < 0:
        _fail('nonfinite', 'must be >= 0')
    if 'invalid' in state and bool((_tensor(state, 'invalid', (2,), torch.int64) < 0).any()):
        _fail('invalid', 'must be >= 0')
    mse = _tensor(state, 'mse', (K,), torch.float64)
    if not bool((torch.isfinite(mse) & (mse >= 0)).all()):
        _fail('mse', 'must be finite and >= 0')

    # Counters: the next refresh check lies after the clock it counts on (steps or images).
    nimg, refreshes = _number(state, 'nimg', True), _number(state, 'refreshes', True)
    steps = _number(state, 'steps', True) if 'steps' in state else 0
    if state.get('last_refresh_nimg') is not None:
        _number(state, 'last_refresh_nimg', True)
    next_check = _number(state, 'next_check' if 'next_check' in state else 'next_check_nimg')
    clock = steps if in_steps else nimg
    if not next_check > clock:
        _fail('next_check', f'({next_check:g}) must lie after the {"steps" if in_steps else "images"} seen ({clock})')

    # A table, a profile and a positive pivot exist exactly when a refresh has happened.
    if (state['table'] is None) != (refreshes == 0) or (state['profile'] is None) != (refreshes == 0):
        _fail('table', f'and profile must be present exactly when refreshes > 0 (refreshes = {refreshes})')
    pivot = state['pivot']
    if refreshes > 0:
        _check_table(state['table'], K, build)
        if isinstance(pivot, bool) or not isinstance(pivot, numbers.Real) or not 0 < pivot < math.inf:
            _fail('pivot', f'must be a finite number > 0 after a refresh, got {pivot!r}')
        if not isinstance(state['profile'], dict):
            _fail('profile', 'must be a dict (Profile.to_dict())')
        try:
            points = len(Profile.from_dict(state['profile']).sigma)
        except ValueError as e:
            _fail('profile', f'is not a profile ({e})')
        if points != K:
            _fail('profile', f'must have {K} points, got {points}')
    raw = state.get('raw_pivots', [])
    if not isinstance(raw, list) or len(raw) > DEBOUNCE or not all(isinstance(v, numbers.Real) and v > 0 for v in raw):
        _fail('raw_pivots', f'must be a list of at most {DEBOUNCE} positive numbers')


def save_state(noise: Any) -> dict[str, Any]:
    """Everything a bit-exact resume of the InfoNoise `noise` needs, as CPU tensors, numbers, lists and dicts."""
    table = noise.table
    return dict(
        buffer=noise.buffer.cpu(), ptr=noise.ptr.cpu(), count=noise.count.cpu(), nonfinite=noise.nonfinite.cpu(),
        invalid=noise.invalid.cpu(), mse=noise.mse.clone(), nimg=noise.nimg, steps=noise.steps,
        next_check=noise.next_check, refreshes=noise.refreshes, pivot=noise.pivot, raw_pivots=list(noise.raw_pivots),
        last_refresh_nimg=noise.last_refresh_nimg,
        table=None if table is None else {key: getattr(table, key).cpu() for key in TABLES[noise.build][0]},
        frozen=noise.frozen,
        profile=None if noise.profile() is None else noise.profile().to_dict(),
    )  # fmt: skip


def load_state(noise: Any, state: dict[str, Any]) -> None:
    """Check `state` against `noise`'s configuration (`check_state`), then restore it into `noise` (on the CPU;
    the next `sample` or `observe` moves it to its device). Fields older states lack get their defaults."""
    check_state(state, noise.grid.num_bins, noise.buffer_size, noise.in_steps, noise.build)
    noise._reset()
    noise.device = torch.device('cpu')
    noise.buffer, noise.ptr, noise.count = state['buffer'].clone(), state['ptr'].clone(), state['count'].clone()
    noise.nonfinite, noise.mse = state['nonfinite'].clone(), state['mse'].clone()
    noise.invalid = state['invalid'].clone() if 'invalid' in state else noise.invalid
    noise.nimg, noise.steps = state['nimg'], state.get('steps', 0)
    noise.next_check = state['next_check'] if 'next_check' in state else state['next_check_nimg']
    noise.refreshes, noise.pivot = state['refreshes'], state['pivot']
    # States written before debouncing existed hold no pivot history: it starts from the pivot in use.
    noise.raw_pivots = list(state.get('raw_pivots', [] if noise.refreshes == 0 else [noise.pivot]))
    noise.last_refresh_nimg = state.get('last_refresh_nimg')
    noise.frozen = bool(state.get('frozen', False))
    if state['table'] is not None:
        kind = InverseCDFTable if noise.build == 'paper' else LogLinearTable
        noise.table = kind(**{key: value.clone() for key, value in state['table'].items()})
        noise._profile = Profile.from_dict(state['profile'])
