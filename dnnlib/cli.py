"""Parameter types shared by the command-line tools."""

import contextlib
import errno
import math
import os

import click
import torch


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
