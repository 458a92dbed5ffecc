"""DNA sequences end to end: FASTA/TSV -> dataset_tool.py -> SequenceDataset (one-hot +-1, reverse complements),
the 1-D U-Net, train.py with every sampler, generate.py's FASTA/npz output, and fid.py with a sequence detector."""

import gzip
import json

import numpy as np
import pytest
import torch
from conftest import convert, invoke, write_fasta

import dataset_tool
import fid
import generate
import train
from training import sequences
from training.dataset import SequenceDataset
from training.networks import EDMPrecond
from training.networks_1d import SequenceUNet

COMPLEMENT = str.maketrans('ACGT', 'TGCA')
TINY_SEQ_NET = ['--arch=ddpmpp1d', '--cbase=16', '--cres=1,2', '--blocks=1', '--dropout=0', '--workers=0']


def random_seqs(n, length, seed=0):
    rng = np.random.RandomState(seed)
    return [''.join(rng.choice(list('ACGT'), size=length)) for _ in range(n)]


def test_fasta_round_trip_with_labels_and_one_hot(tmp_path):
    seqs = random_seqs(12, 10)
    seqs[0] = 'acgtACGTac'  # Soft-masked (lower-case) bases are the same bases.
    labels = ['10', '2', '2', '1'] * 3  # Integer names are numbered numerically: 1 -> 0, 2 -> 1, 10 -> 2.
    convert('--source', write_fasta(tmp_path / 'x.fa', seqs, labels), '--dest', tmp_path / 'x.npz')
    tokens, ids, names = sequences.load_npz(str(tmp_path / 'x.npz'))
    assert sequences.decode(tokens) == [s.upper() for s in seqs]
    assert names == ['1', '2', '10'] and ids.tolist() == [2, 1, 1, 0] * 3

    ds = SequenceDataset(str(tmp_path / 'x.npz'), use_labels=True)
    assert ds.image_shape == [4, 1, 10] and ds.resolution == 10 and ds.label_dim == 3 and len(ds) == 12
    x, label = ds[1]
    assert x.dtype == np.uint8 and set(np.unique(x)) == {0, 255}
    onehot = x.astype(np.float32) / 127.5 - 1  # The training loop's normalisation gives the +-1 one-hot matrix.
    np.testing.assert_array_equal(onehot.sum(0), np.full([1, 10], -2.0))
    assert ''.join('ACGT'[i] for i in onehot[:, 0].argmax(0)) == seqs[1]
    assert label.tolist() == [0, 1, 0]


def test_xflip_is_the_reverse_complement(tmp_path):
    seqs = random_seqs(5, 9, seed=3)
    sequences.save_npz(str(tmp_path / 's.npz'), sequences.encode(seqs))
    ds = SequenceDataset(str(tmp_path / 's.npz'), xflip=True)
    assert len(ds) == 10
    for i, s in enumerate(seqs):
        flipped = sequences.decode(sequences.to_tokens(ds[5 + i][0][np.newaxis].astype(np.float32)))[0]
        assert flipped == s.translate(COMPLEMENT)[::-1]


def test_tsv_gzip_crop_and_label_column(tmp_path):
    seqs = random_seqs(6, 14, seed=1)
    rows = ['chr\tsequence\tTAG'] + [f'chr1\t{s}\t{"K562" if i % 2 else "GM12878"}' for i, s in enumerate(seqs)]
    with gzip.open(tmp_path / 't.tsv.gz', 'wt') as f:
        f.write('\n'.join(rows) + '\n')
    convert('--source', tmp_path / 't.tsv.gz', '--dest', tmp_path / 't.npz', '--label-column=TAG', '--length=10')
    tokens, ids, names = sequences.load_npz(str(tmp_path / 't.npz'))
    assert sequences.decode(tokens) == [s[2:12] for s in seqs]  # Centre crop.
    assert names == ['GM12878', 'K562'] and ids.tolist() == [0, 1] * 3
    convert('--source', tmp_path / 't.tsv.gz', '--dest', tmp_path / 'u.npz', '--max-images=4')
    tokens, ids, _ = sequences.load_npz(str(tmp_path / 'u.npz'))
    assert tokens.shape == (4, 14) and ids is None


@pytest.mark.parametrize(
    'content, args, message',
    [
        ('>a\nACGN\n', [], 'contains "N"'),
        ('>a\nACGT\n>b\nACG\n', [], 'length 3'),
        ('>a label=x\nACGT\n>b\nACGT\n', [], 'some records have a label'),
        ('ACGT\n', [], 'before the first'),
        ('>a\nACGT\n', ['--length=5'], 'shorter than --length=5'),
        ('>a\nACGT\n', ['--resolution=8x8'], '--resolution applies to images'),
        ('>a\nACGT\n', ['--label-column=TAG'], '--label-column applies to TSV'),
    ],
)
def test_dataset_tool_sequence_errors(tmp_path, content, args, message):
    (tmp_path / 'x.fa').write_text(content)
    result = invoke(dataset_tool.main, '--source', tmp_path / 'x.fa', '--dest', tmp_path / 'x.npz', *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / 'x.npz').exists()


def test_dataset_tool_tsv_and_dest_errors(tmp_path):
    (tmp_path / 't.tsv').write_text('id\tseq\n1\tACGT\n')
    result = invoke(dataset_tool.main, '--source', tmp_path / 't.tsv', '--dest', tmp_path / 't.npz')
    assert result.exit_code != 0 and 'no column "sequence"; its columns are id, seq' in result.output
    result = invoke(dataset_tool.main, '--source', tmp_path / 't.tsv', '--dest', tmp_path / 't.zip')
    assert result.exit_code != 0 and 'written to one .npz' in result.output
    result = invoke(dataset_tool.main, '--source=mnist5k', '--dest', tmp_path / 'm.npz')
    assert result.exit_code != 0 and '--source must be FASTA, TSV, ars or ecoli' in result.output


@pytest.mark.parametrize('num, fraction', [(1000, 0.1), (603_569, 0.1), (7, 0.5), (3, 0.1)])
def test_split_indices_partition_the_rows(num, fraction):
    train, test = sequences.split_indices(num, 'train', fraction), sequences.split_indices(num, 'test', fraction)
    assert len(test) == round(fraction * num) and len(train) == num - len(test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(num))  # Disjoint, covering.
    np.testing.assert_array_equal(sequences.split_indices(num, 'train', fraction), train)  # Fixed.
    np.testing.assert_array_equal(sequences.split_indices(num, 'all', fraction), np.arange(num))
    assert train.dtype == test.dtype == np.int64


def test_split_indices_shuffle_and_errors():
    # One fixed shuffle: a larger test fraction moves rows from the front of the train split into the test split.
    order = np.concatenate([sequences.split_indices(100, 'test', 0.1), sequences.split_indices(100, 'train', 0.1)])
    np.testing.assert_array_equal(sequences.split_indices(100, 'test', 0.3), order[:30])
    assert order.tolist() != list(range(100))
    with pytest.raises(ValueError, match='Unknown split "valid"'):
        sequences.split_indices(10, 'valid')
    for fraction in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match='test_fraction must lie in'):
            sequences.split_indices(10, 'train', fraction)


@pytest.mark.parametrize('length, mult, attn', [(16, [1, 2], [8]), (64, [1, 2, 2], [16]), (12, [2, 1, 1], [])])
def test_sequence_unet_shapes_and_gradients(length, mult, attn):
    torch.manual_seed(0)
    net = EDMPrecond(
        length, 4, label_dim=3, model_type='SequenceUNet', model_channels=8, channel_mult=mult, num_blocks=1,
        attn_resolutions=attn, dropout=0,
    )  # fmt: skip
    assert net.img_shape == [4, 1, length]
    x = torch.randn(5, 4, 1, length)
    out = net(x, torch.rand(5) * 10 + 0.01, torch.eye(3)[[0, 1, 2, 0, 1]])
    assert out.shape == x.shape and out.dtype == torch.float32
    out.square().sum().backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad  # Every layer is used.
    n_attn = sum(isinstance(m, torch.nn.Module) and getattr(m, 'attention', False) for m in net.modules())
    assert n_attn == 1 + 2 * len(attn)  # The bottleneck block, plus one encoder and one decoder block per length.


def test_sequence_unet_rejects_bad_lengths_and_shapes():
    with pytest.raises(ValueError, match='multiple of 2\\^2'):
        SequenceUNet(img_resolution=10, in_channels=4, out_channels=4, model_channels=8, channel_mult=(1, 1, 1))
    net = SequenceUNet(img_resolution=8, in_channels=4, out_channels=4, model_channels=8, channel_mult=(1, 1))
    with pytest.raises(ValueError, match=r'takes \[N, C, 1, L\]'):
        net(torch.zeros(1, 4, 8, 8), torch.zeros(1), None)


@pytest.fixture(scope='module')
def two_class_dna(tmp_path_factory):
    """Two classes, each one fixed 16-bp sequence (64 copies each): a conditional model must reproduce them."""
    path = tmp_path_factory.mktemp('dna')
    seqs = ['ACGTTGCAAACCGGTT', 'GGGGCCCCATATATAT']
    write_fasta(path / 'two.fa', seqs * 64, ['a', 'b'] * 64)
    convert('--source', path / 'two.fa', '--dest', path / 'two.npz')
    return path / 'two.npz', seqs


@pytest.fixture(scope='module')
def trained(two_class_dna, tmp_path_factory):
    data, _ = two_class_dna
    out = tmp_path_factory.mktemp('run')
    result = invoke(
        train.main, '--outdir', out, '--data', data, '--cond=1', *TINY_SEQ_NET, '--duration=0.002', '--batch=32',
        '--lr=0.01', '--lr-rampup=0', '--ema=0', '--tick=1', '--snap=2', '--nosubdir', '--device=cpu', '--seed=0',
        '--sampler=infonoise', '--weight=uniform', '--info-warmup=0.5', '--info-refresh=0.5',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_training_learns_the_sequences_and_generate_writes_fasta(two_class_dna, trained, tmp_path):
    _, seqs = two_class_dna
    options = json.loads((trained / 'training_options.json').read_text())
    assert options['dataset_kwargs']['class_name'] == 'training.dataset.SequenceDataset'
    assert options['noise_kwargs']['endpoint'] == 'discrete'  # One-hot data has discrete endpoints.
    snapshot = trained / 'network-snapshot-000002.pt'
    for cls, expected in enumerate(seqs):
        out = tmp_path / f'c{cls}'
        result = invoke(
            generate.main, '--network', snapshot, '--outdir', out, '--seeds=0-15', '--steps=10', f'--class={cls}',
            '--npz', out / 's.npz', '--device=cpu',
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        lines = (out / 'sequences.fasta').read_text().splitlines()
        assert lines[0] == f'>seed000000 label={cls}' and len(lines) == 32
        tokens, labels, _ = sequences.load_npz(str(out / 's.npz'))
        assert sequences.decode(tokens) == lines[1::2] and labels.tolist() == [cls] * 16
        assert np.load(out / 's.npz')['seeds'].tolist() == list(range(16))
        accuracy = np.mean([a == b for s in lines[1::2] for a, b in zip(s, expected)])
        assert accuracy > 0.9, (cls, accuracy, lines[1::2])  # Chance is 0.25.


@pytest.mark.parametrize('sampler', ['lognormal', 'loguniform'])
def test_every_sampler_trains_sequences(two_class_dna, tmp_path, sampler):
    result = invoke(
        train.main, '--outdir', tmp_path, '--data', two_class_dna[0], *TINY_SEQ_NET, '--duration=0.0005',
        '--batch=16', '--tick=1', '--nosubdir', '--device=cpu', '--seed=0', f'--sampler={sampler}', '--xflip=1',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / 'network-snapshot-000000.pt').exists()


@pytest.mark.parametrize(
    'args, message',
    [
        (['--arch=ddpmpp'], 'holds sequences; train them with --arch=ddpmpp1d'),
        (['--arch=ddpmpp1d', '--augment=0.1'], '--augment is for images'),
    ],
)
def test_train_refuses_mismatched_arch(two_class_dna, tmp_path, args, message):
    result = invoke(train.main, '--outdir', tmp_path, '--data', two_class_dna[0], '--dry-run', *args)
    assert result.exit_code != 0 and message in result.output, result.output


def test_train_refuses_1d_arch_on_images(digits_zip, tmp_path):
    result = invoke(train.main, '--outdir', tmp_path, '--data', digits_zip, '--arch=ddpmpp1d', '--dry-run')
    assert result.exit_code != 0 and 'is for sequence datasets' in result.output


def test_generate_refuses_image_options_for_sequences(trained, tmp_path):
    for flag in ('--binarize', '--subdirs', f'--grid-png={tmp_path / "g.png"}'):
        result = invoke(
            generate.main, '--network', trained / 'network-snapshot-000002.pt', '--outdir', tmp_path / 'out', flag
        )
        assert result.exit_code != 0 and 'is for images' in result.output, result.output


class KmerDetector(torch.nn.Module):
    """Base and neighbouring-pair frequencies: 4 + 16 features of a one-hot [N, 4, L]."""

    def forward(self, x):
        pairs = torch.einsum('nil,njl->nij', x[:, :, :-1], x[:, :, 1:]).flatten(1) / (x.shape[2] - 1)
        return torch.cat([x.mean(2), pairs], dim=1)


@pytest.mark.filterwarnings('ignore:`torch.jit.:DeprecationWarning')  # A user's detector file may be TorchScript.
def test_fid_with_a_sequence_detector(tmp_path):
    detector = tmp_path / 'kmer.pt'
    torch.jit.trace(KmerDetector(), torch.zeros(2, 4, 12)).save(str(detector))
    data = random_seqs(300, 12, seed=5)
    sequences.save_npz(str(tmp_path / 'data.npz'), sequences.encode(data))
    sequences.save_npz(str(tmp_path / 'same.npz'), sequences.encode(data), seeds=range(300))
    sequences.save_npz(str(tmp_path / 'poly.npz'), sequences.encode(['A' * 6 + 'C' * 6] * 150 + ['GT' * 6] * 150))
    result = invoke(
        fid.main, 'ref', '--data', tmp_path / 'data.npz', '--dest', tmp_path / 'ref.npz', '--detector', detector
    )
    assert result.exit_code == 0, result.output
    mu, sigma = np.load(tmp_path / 'ref.npz')['mu'], np.load(tmp_path / 'ref.npz')['sigma']
    features = KmerDetector()(
        torch.from_numpy(sequences.one_hot(sequences.encode(data))[:, :, 0].astype(np.float32) / 255)
    )
    np.testing.assert_allclose(mu, features.double().mean(0).numpy(), atol=1e-6)
    assert mu.shape == (20,) and sigma.shape == (20, 20)

    scores = {}
    for name in ('same', 'poly'):
        args = ['calc', '--images', tmp_path / f'{name}.npz', '--ref', tmp_path / 'ref.npz', '--num=300']
        result = invoke(fid.main, *args, '--detector', detector, '--workers=0')
        assert result.exit_code == 0, result.output
        scores[name] = float(result.output.strip().splitlines()[-1])
    assert abs(scores['same']) < 1e-6 and scores['poly'] > 0.1

    result = invoke(fid.main, 'ref', '--data', tmp_path / 'data.npz', '--dest', tmp_path / 'r.npz', '--detector=mnist')
    assert result.exit_code != 0 and 'takes images; sequences need a TorchScript sequence detector' in result.output
