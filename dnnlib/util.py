"""EasyDict, construct-by-name, logging tee, time formatting, atomic writes (and the removal of the temporary files a
killed writer leaves) and a caching URL opener.

The configuration of a run is a tree of plain dicts whose `class_name` entries name the class to build
(EDM's convention); `construct_class_by_name` turns such a dict into an object.
"""

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class EasyDict(dict):
    """A dict whose keys can also be read and written as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


# `.{basename}.{pid}.{8 hex digits}.tmp`: the temporary sibling of a file being written (see temp_path).
TEMP_NAME = re.compile(r'\.(?P<base>.+)\.(?P<pid>[1-9][0-9]*)\.[0-9a-f]{8}\.tmp')


def temp_path(path: str) -> str:
    """A fresh temporary sibling of `path` named `.{basename}.{pid}.{hex}.tmp`: hidden, unique, and marked with the
    writer's process id so that remove_stale_temp_files can tell a killed writer's leftovers from a live one's."""
    path = os.path.abspath(path)
    name = f'.{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp'
    return os.path.join(os.path.dirname(path), name)


def is_live_process(pid: int) -> bool:
    """Whether a process with this id runs on this host (possibly another user's: signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # It exists but belongs to someone else.
        return True
    return True


def remove_stale_temp_files(directory: str, own_pid_is_stale: bool = False, base: str | None = None) -> list[str]:
    """Remove the temporary files (or folders) named as temp_path names them whose writer process is gone from this
    host, e.g. after a SIGKILL or power loss; return their names, sorted. Everything else stays, including the
    temporary files of live processes. A directory shared with other hosts may hold a live writer's file whose pid
    is free here: call this only on directories that processes of this host write. `own_pid_is_stale`: the caller
    writes nothing there now, so a file with its pid is a dead writer's whose pid it reuses (a restarted container
    numbers its processes from 1 again). `base`: remove only the temporary files of `directory/base`."""
    removed = []
    for name in sorted(os.listdir(directory)):
        match = TEMP_NAME.fullmatch(name)
        if match is not None and base is not None and match.group('base') != base:
            continue
        pid = int(match.group('pid')) if match else 0
        # A pid beyond any pid_t was not written by temp_path: keep the file rather than guess.
        if match is None or pid >= 2**31 or (is_live_process(pid) and not (own_pid_is_stale and pid == os.getpid())):
            continue
        path = os.path.join(directory, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:  # Someone else removed it first.
            continue
        removed.append(name)
    return removed


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb', **open_kwargs):
    """Write `path` through a temporary file beside it that replaces it only once complete and flushed to disk: a
    reader (or a killed writer) sees the old file or the whole new one, never a part; on an error the temporary file
    is removed and `path` is untouched. The file gets the usual umask permissions (unlike mkstemp's 0600)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode.replace('w', 'x'), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if hasattr(os, 'O_DIRECTORY'):  # Persist the rename itself where the platform allows it.
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_json(text: str | bytes, what: str) -> Any:
    """Parse JSON text; ValueError, one line naming `what`, for text that is not JSON or nests too deep for Python's
    parser (a 100,000-deep list raises RecursionError, which no caller expects)."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{what} is not valid JSON ({e})') from None
    except RecursionError:
        raise ValueError(f'{what} nests JSON too deeply to read') from None


def read_json(path: str, what: str | None = None) -> Any:
    """load_json of a file's contents; `what` names it in errors (default: the path in quotes)."""
    with open(path, 'rb') as f:
        return load_json(f.read(), what or f'"{path}"')


def get_obj_by_name(name: str) -> Any:
    """Return the object named by a dotted path, e.g. 'training.networks.EDMPrecond'."""
    module_name, _, attr = name.rpartition('.')
    if not module_name:
        raise ValueError(f'Not a dotted name: "{name}"')
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f'Cannot import "{module_name}" for "{name}": {e}') from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f'Module "{module_name}" has no attribute "{attr}"') from None


def construct_class_by_name(*args, class_name: str, **kwargs) -> Any:
    """Build `class_name(*args, **kwargs)` from a dotted class name."""
    return get_obj_by_name(class_name)(*args, **kwargs)


# The longest list parse_int_list builds: 200x EDM's 50,000-image FID sets, and a few hundred MB of ints.
MAX_LIST_LENGTH = 10_000_000


def parse_int_list(s: str | list[int]) -> list[int]:
    """Parse a comma-separated list of non-negative integers and ranges: '1,2,5-10' -> [1, 2, 5, ..., 10]."""
    if isinstance(s, list):
        return s
    values = []
    for part in s.split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if m is None:
            raise ValueError(f'"{part}" is neither a non-negative integer nor a range like 5-10')
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise ValueError(f'Range "{part}" is empty')
        if len(values) + last - first + 1 > MAX_LIST_LENGTH:
            raise ValueError(f'"{s}" lists more than {MAX_LIST_LENGTH:,} values')
        values.extend(range(first, last + 1))
    return values


def format_time(seconds: float) -> str:
    """Human-readable duration: 45s, 3m 05s, 2h 03m, 1d 04h."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h'


class Logger:
    """Tee stdout and stderr into a log file (append mode) while still printing them."""

    def __init__(self, file_name: str | None = None, file_mode: str = 'a', should_flush: bool = True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def write(self, text: str) -> None:
        if not text:
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None


def make_cache_dir_path(*paths: str) -> str:
    """Cache location: $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib (EDM's convention)."""
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    return os.path.join(os.path.expanduser('~'), '.cache', 'dnnlib', *paths)


def is_url(obj: Any) -> bool:
    """True for http(s):// and file:// strings."""
    return isinstance(obj, str) and re.match(r'^(https?|file)://', obj) is not None


def open_url(
    url: str,
    cache_dir: str | None = None,
    num_attempts: int = 10,
    verbose: bool = True,
    return_filename: bool = False,
    cache: bool = True,
    timeout: float = 10,
) -> Any:
    """Open a local path, file:// URL or http(s):// URL as a binary file object.

    Downloads are cached under `cache_dir` (default make_cache_dir_path('downloads')) as
    '<md5(url)>_<safe name>' and written atomically, so an interrupted download never leaves a partial file; a cached
    URL opens offline. A transfer that fails once the server has answered is retried `num_attempts` times; a host
    that does not answer at all (no name resolution, connection refused, no route, nothing within `timeout` seconds)
    fails at once, so that an offline machine gets its error in seconds rather than after minutes of retries.
    """
    assert num_attempts >= 1
    if not re.match(r'^[a-z]+://', url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f'No such file: "{url}"')
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        path = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'No such file: "{url}"')
        return path if return_filename else open(path, 'rb')
    if not url.startswith(('http://', 'https://')):
        raise ValueError(f'Unsupported URL scheme: "{url}"')
    assert cache or not return_filename

    # Look in the cache first.
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    if cache and os.path.isdir(cache_dir):
        for name in sorted(os.listdir(cache_dir)):
            if name.startswith(url_md5 + '_'):
                path = os.path.join(cache_dir, name)
                return path if return_filename else open(path, 'rb')

    # Download, retrying on failure.
    data = None
    for attempt in range(num_attempts):
        response = None
        try:
            if verbose:
                print(f'Downloading {url} ...', end='', flush=True)
            response = urllib.request.urlopen(url, timeout=timeout)
            with response:
                data = response.read()
            if verbose:
                print(' done')
            break
        except OSError as e:
            if verbose:
                print(' failed')
            # A host that never answered (offline, no such name, a closed port) would not answer the retries either.
            answered = response is not None or isinstance(e, urllib.error.HTTPError)
            if not answered or attempt == num_attempts - 1:
                reason = e if answered else getattr(e, 'reason', e)  # URLError wraps the socket's error.
                raise OSError(f'Could not download "{url}": {reason}') from e
            time.sleep(min(2**attempt, 30))

    # Save atomically to the cache.
    if cache:
        safe_name = re.sub(r'[^0-9a-zA-Z-._]', '_', os.path.basename(urllib.parse.urlparse(url).path))[:128]
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f'{url_md5}_{safe_name}')
        with atomic_write(path) as f:
            f.write(data)
        if return_filename:
            return path
    return io.BytesIO(data)
