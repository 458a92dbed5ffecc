"""σ-grid inputs read from files (InfoNoise paper, Eq. 19; EDM's convention of N+1 descending σ ending in 0):
a grid itself (`read_grid_file`, e.g. the grid.json generate.py writes) and the variances of a Gaussian source for
the closed-form InfoGrid `grids.tangent_grid` (`read_variances`). Every problem is a one-line ValueError naming
the file, including JSON nested too deeply for Python's parser (which raises RecursionError).
"""

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch


def _read_json(path: str) -> tuple[str, Any]:
    """The text of file `path` and its JSON value (None if it is not JSON); ValueError naming the file if it is not
    UTF-8 text or nests JSON too deeply for Python's parser."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError:
        raise ValueError(f'"{path}" is not a text file') from None
    try:
        return text, json.loads(text)
    except json.JSONDecodeError:
        return text, None
    except RecursionError:
        raise ValueError(f'"{path}" nests JSON too deeply to read') from None


def parse_grid_values(values: Sequence[float] | dict) -> torch.Tensor:
    """A grid from a list of sigma values (or a dict with a "sigmas" list): descending, positive, 0 appended if absent."""
    if isinstance(values, dict):
        values = values.get('sigmas')
    try:
        sigmas = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError('a grid must be a list of numbers (or a JSON object with a "sigmas" list)') from None
    if sigmas.ndim != 1:
        raise ValueError('a grid must be a flat list of numbers')
    if len(sigmas) and sigmas[-1] != 0:
        sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    if len(sigmas) < 3:
        raise ValueError(f'a grid needs at least 2 positive sigma values, got {len(sigmas) - 1}')
    if not torch.isfinite(sigmas).all() or not (sigmas[:-1] > 0).all() or not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError('grid values must be finite, positive and strictly descending (a final 0 is optional)')
    return sigmas


def read_grid_file(path: str) -> torch.Tensor:
    """A grid from a file: a JSON list (or object with "sigmas", as generate.py writes) or whitespace/comma-separated text."""
    text, values = _read_json(path)
    if values is None:
        try:
            values = [float(v) for v in text.replace(',', ' ').split()]
        except ValueError:
            raise ValueError(f'"{path}" is neither JSON nor a list of numbers') from None
    try:
        return parse_grid_values(values)
    except ValueError as e:
        raise ValueError(f'"{path}": {e}') from None


def read_variances(spec: str) -> list[float]:
    """The variances λ of a Gaussian source for `grids.tangent_grid`, from `spec`: a positive number (one scale, the
    data's standard deviation: λ = scale²) or a JSON file holding a list of variances or an object with a
    "variances" list (e.g. the data's PCA spectrum). ValueError if it is neither; OSError if the file is unreadable."""
    try:
        scale = float(spec)
    except ValueError:
        scale = None
    if scale is not None:
        if not 0 < scale < math.inf:
            raise ValueError(f'the tangent scale must be a positive finite number, got {spec}')
        return [scale**2]
    if not os.path.isfile(spec):
        raise ValueError(f'"{spec}" is neither a number nor a file')
    data = _read_json(spec)[1]
    try:
        return [float(v) for v in (data['variances'] if isinstance(data, dict) else data)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f'"{spec}" holds no JSON list of variances (or object with a "variances" list)') from None
