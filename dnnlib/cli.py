"""What the command-line tools share: parameter types, device choice, output checks, disk errors and presets."""

import contextlib
import errno
import math
import os

import click
import torch

from . import util


class FloatRange(click.FloatRange):
    """click.FloatRange that also refuses NaN, which passes every bound check of click's (comparisons with NaN are
    false), and ±inf unless `allow_inf`: a non-finite learning rate, σ or EMA would otherwise train or sample
    silently into NaN."""

    def __init__(self, min=None, max=None, min_open=False, max_open=False, allow_inf=False):
        super().__init__(min=min, max=max, min_open=min_open, max_open=max_open)
        self.allow_inf = allow_inf

    def _describe_range(self) -> str:
        return 'finite' if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)  # First as a number, so NaN and ±inf get their own message.
        if math.isnan(number) or (math.isinf(number) and not self.allow_inf):
            self.fail(f'{value!r} is not a finite number.', param, ctx)
        return super().convert(number, param, ctx)


FLOAT = FloatRange()  # Any finite number.


def pick_device(name: str | None) -> torch.device:
    """--device: CUDA if available unless told otherwise; a one-line error for CUDA on a machine without it."""
    if name == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device=cuda, but no CUDA device is available')
    return torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))


def check_output_dir(path: str, option: str) -> None:
    """A one-line error, before any work, if folder `path` could not be created or written: it is a file, or its
    nearest existing ancestor is not writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise click.ClickException(f'{option}: "{path}" exists and is not a folder')
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise click.ClickException(f'{option}: cannot write into "{existing}"')


# Write errors that are the machine's, not the program's: they end a command with one line instead of a traceback.
DISK_ERRORS = {
    errno.ENOSPC: 'No space left on the device',
    errno.EFBIG: 'File size limit exceeded',
    errno.EDQUOT: 'Disk quota exceeded',
    errno.EROFS: 'Read-only file system',
}


@contextlib.contextmanager
def disk_errors(where: str):
    """Turn a full disk, a file size limit (`ulimit -f`: Python ignores SIGXFSZ, so the write fails with EFBIG), a
    quota or a read-only file system met inside the block into one line naming `where`; other errors pass."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        raise click.ClickException(f'{DISK_ERRORS[e.errno]} while writing {where}: {e.filename or e}') from None


def read_preset(name: str, presets_dir: str) -> dict:
    """A preset's options: PRESETS_DIR/NAME.json, or a user's own JSON file when NAME is a path (holds '/' or ends in
    .json); keys starting with '_' are comments."""
    is_path = '/' in name or os.sep in name or name.endswith('.json')
    path = name if is_path else os.path.join(presets_dir, f'{name}.json')
    if not os.path.isfile(path):
        if is_path:
            raise click.ClickException(f'--preset: no such file "{name}"')
        names = sorted(f[:-5] for f in os.listdir(presets_dir) if f.endswith('.json'))
        raise click.ClickException(f'Unknown preset "{name}"; available: {", ".join(names)} (or a path to a JSON file)')
    try:
        preset = util.read_json(path)
    except (OSError, ValueError) as e:
        raise click.ClickException(f'--preset: {e}') from None
    if not isinstance(preset, dict):
        raise click.ClickException(f'--preset: "{path}" must hold a JSON object of option names and values')
    return {key: value for key, value in preset.items() if not key.startswith('_')}


def preset_value_error(param: click.Parameter, value) -> str | None:
    """Why a preset's JSON value does not fit its option's type, which click would coerce silently (true -> 1,
    32.7 -> 32); None if it fits. Strings go through the option's own parser, as on the command line; an option
    parsed by a function (click's FuncParamType) takes a list of non-negative integers."""
    kind = param.type
    if value is None or isinstance(value, str):
        return None
    if isinstance(kind, click.types.BoolParamType):
        return None if isinstance(value, bool) else f'{value!r} is not true or false'
    if isinstance(kind, (click.types.IntParamType, click.IntRange)):
        return None if isinstance(value, int) and not isinstance(value, bool) else f'{value!r} is not an integer'
    if isinstance(kind, (click.types.FloatParamType, click.FloatRange)):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else f'{value!r} is not a number'
    if isinstance(kind, click.types.FuncParamType):
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        return None if ok else f'{value!r} is not a list of non-negative integers'
    return f'{value!r} is not a {kind.name}'


def options_with_preset(
    ctx: click.Context, preset: str | None, presets_dir: str, fixed: tuple[str, ...] = ()
) -> tuple[util.EasyDict, set[str]]:
    """The command's options with the preset (see read_preset) filling those the user did not set, and the names the
    user set. Every preset value is checked like its option, also those the command line overrides; the options
    named in `fixed` cannot be preset."""
    opts = util.EasyDict(ctx.params)
    given = {name for name in opts if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    params = {p.name: p for p in ctx.command.params}
    for key, value in (read_preset(preset, presets_dir) if preset is not None else {}).items():
        name = key.replace('-', '_')
        if name not in params or name in fixed:
            raise click.ClickException(f'Preset "{preset}" sets unknown or non-presettable option "{key}"')
        try:
            if message := preset_value_error(params[name], value):
                raise ValueError(message)
            value = params[name].type_cast_value(ctx, value)
        except (click.BadParameter, TypeError, ValueError) as e:
            message = e.message if isinstance(e, click.BadParameter) else str(e) or f'{value!r} is not valid'
            raise click.ClickException(f'Preset "{preset}": "{key}": {message}') from None
        if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT:
            opts[name] = value
    return opts, given
