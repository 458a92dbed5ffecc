"""Write a dataset all at once or not at all (dataset_tool.py's output): files go into a temporary sibling of the
destination (a ZIP_STORED archive, a folder or one file), renamed into place only when complete. EDM writes in place.

An error, a full disk, Ctrl-C (SIGINT) or a SIGTERM (what `kill` and cluster schedulers send) removes the temporary
output; a SIGKILL cannot be caught, so the next writer of the same destination removes what a killed one left. Errors
are one line naming the destination as the command line gave it (`option`, e.g. '--dest', and its value).
"""

import contextlib
import os
import shutil
import signal
import threading
import zipfile

from dnnlib import util

KINDS = ('zip', 'folder', 'file')


class DestinationError(Exception):
    """One line: the destination is taken, or writing it failed (e.g. ENOSPC, a full disk, or EFBIG, a file size
    limit), in which case the partial output is gone."""


def check_dest(dest: str, overwrite: bool, option: str = '--dest') -> str:
    """The kind of output `dest` names ('zip' for *.zip, 'file' for *.npz, else 'folder'), after the one check of
    every output: what is there is replaced only if `overwrite` (the --overwrite flag), and never by another kind."""
    if dest == '':
        raise DestinationError(f'{option} must not be empty')
    kind = 'zip' if dest.lower().endswith('.zip') else 'file' if dest.lower().endswith('.npz') else 'folder'
    named = {'zip': 'a zip archive', 'file': 'an .npz file'}.get(kind)
    if named is not None and os.path.isdir(dest):
        raise DestinationError(f'{option} names {named} but is a folder: {dest}')
    if kind != 'folder' and os.path.exists(dest) and not overwrite:
        raise DestinationError(f'{option} exists (add --overwrite to replace it): {dest}')
    if kind == 'folder' and os.path.exists(dest) and not os.path.isdir(dest):
        raise DestinationError(f'{option} exists and is not a folder: {dest}')
    if kind == 'folder' and os.path.isdir(dest) and os.listdir(dest) and not overwrite:
        raise DestinationError(f'{option} folder must be empty (add --overwrite to replace it): {dest}')
    return kind


class DatasetWriter:
    """Write a dataset of kind 'zip', 'folder' or 'file' (one file) to `dest`, replacing what is there on success.

    Use as a context manager: `with DatasetWriter(dest, 'zip') as writer: writer.write(name, data)`. The temporary
    sibling is named as dnnlib.util.temp_path names it. While the writer is open, SIGTERM raises SystemExit(143) (and
    SIGINT KeyboardInterrupt, as usual), so that the cleanup runs; signals that arrive while the result is being moved
    into place wait until it is. Whether `dest` may be replaced is check_dest's business.
    """

    def __init__(self, dest: str, kind: str, option: str = '--dest'):
        if kind not in KINDS:
            raise ValueError(f'Unknown dataset kind "{kind}"; expected one of {", ".join(KINDS)}')
        self.where = f'{option} {dest}'
        self.dest = os.path.abspath(dest)
        self.kind = kind
        self.zip = None
        self.tmp = util.temp_path(self.dest)
        self.committing = False
        self.pending_signal = None
        self.old_handlers = {}

        # Remember which parent folders we create, to remove them again on failure.
        parent = os.path.dirname(self.dest)
        self.created = []
        while not os.path.isdir(parent) and parent != os.path.dirname(parent):
            self.created.append(parent)
            parent = os.path.dirname(parent)
        with self.errors():
            if not self.created:
                util.remove_stale_temp_files(parent, base=os.path.basename(self.dest))
            os.makedirs(os.path.dirname(self.dest), exist_ok=True)
            if kind == 'zip':
                self.zip = zipfile.ZipFile(self.tmp, mode='x', compression=zipfile.ZIP_STORED)
            elif kind == 'folder':
                os.mkdir(self.tmp)

    @contextlib.contextmanager
    def errors(self):
        """Turn an OSError into a DestinationError after removing the partial output."""
        try:
            yield
        except OSError as e:
            self.discard()
            raise DestinationError(f'Cannot write {self.where}: {e}') from e

    def write(self, name: str, data: bytes) -> None:
        """Add the file `name` ('/'-separated; '' for the one file of kind 'file') holding `data`."""
        with self.errors():
            if self.kind == 'zip':
                self.zip.writestr(name, data)
                return
            path = self.tmp if self.kind == 'file' else os.path.join(self.tmp, *name.split('/'))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'xb' if self.kind == 'file' else 'wb') as f:
                f.write(data)

    def commit(self) -> None:
        """Finish the zip and move the result to `dest`, replacing what is there."""
        if self.kind == 'zip':
            self.zip.close()  # Writes the central directory: may fail on a full disk too.
        if self.kind != 'folder' or not os.path.isdir(self.dest):
            os.replace(self.tmp, self.dest)
            return
        # A folder cannot be replaced in one rename: move the old one aside (under a temp_path name, so that even a
        # kill between the renames leaves nothing that remove_stale_temp_files misses), then delete it.
        old = util.temp_path(self.dest)
        os.rename(self.dest, old)
        try:
            os.rename(self.tmp, self.dest)
        except OSError:
            os.rename(old, self.dest)
            raise
        shutil.rmtree(old, ignore_errors=True)  # The new dataset is in place; a leftover here is only stale.

    def discard(self) -> None:
        """Remove the temporary output and the parent folders made for it; never raises (an error is on its way)."""
        if self.zip is not None:
            with contextlib.suppress(Exception):
                self.zip.close()  # Closes the file even when writing the central directory fails.
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(self.tmp)
        for folder in self.created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    def on_signal(self, signum: int, frame) -> None:
        if self.committing:
            self.pending_signal = signum  # Raised once the result is in place: a half-done swap would lose data.
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)  # The shell's exit status for a process ended by this signal.

    def __enter__(self) -> 'DatasetWriter':
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only.
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.old_handlers[signum] = signal.signal(signum, self.on_signal)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.discard()
                return
            self.committing = True
            with self.errors():
                self.commit()
            self.committing = False
        except BaseException:
            self.discard()
            raise
        finally:
            for signum, handler in self.old_handlers.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
            if self.pending_signal is not None:
                self.committing = False
                self.on_signal(self.pending_signal, None)
