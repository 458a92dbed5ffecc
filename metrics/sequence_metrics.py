"""Exact statistics of DNA sequences, to compare generated sequences with real ones without a learned detector.

Every function takes base indices, uint8 [N, L] with values 0..3 indexing ALPHABET 'ACGT' (the `sequences` array of
training/sequences.py), and counts exactly; nothing is sampled or learned. Three questions:
- does each position have the right base composition (`base_frequencies`, `base_frequency_error`);
- are short words as frequent as in real DNA (`kmer_spectrum`, `kmer_js`: the Jensen-Shannon divergence of Lin 1991,
  "Divergence measures based on the Shannon entropy", in bits, so between 0 and 1);
- is the GC content of each sequence distributed as in real DNA (`gc_content`, `gc_distance`);
- are generated sequences copies of training ones (`memorised_fraction`).
`kmer_js_range` is the k-mer JS for several k at once. Spectra count the forward strands as given; `both_strands=True`
also counts every reverse complement (a strand-symmetric spectrum), for data of one strand whose orientation carries
no meaning. Both-strand data (genome windows, training.sequences.genome_windows) are symmetric already, so there the
plain spectrum is the stricter choice: it also sees a generator that breaks the strand symmetry.
Imports numpy only, so that a benchmark can use it next to any model.
"""

import dataclasses

import numpy as np

__all__ = [
    'ALPHABET',
    'base_frequencies',
    'base_frequency_error',
    'kmer_spectrum',
    'kmer_js',
    'KmerJS',
    'kmer_js_range',
    'gc_content',
    'gc_distance',
    'memorised_fraction',
    'sequence_stats',
]

ALPHABET = 'ACGT'


def _tokens(tokens: np.ndarray, name: str) -> np.ndarray:
    """`tokens` as an integer array [N, L] with N, L >= 1 and values 0..3; a one-line ValueError otherwise."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.size == 0 or tokens.dtype.kind not in 'iu':
        raise ValueError(
            f'{name}: expected base indices [N, L] with N, L >= 1, got {tokens.dtype} {list(tokens.shape)}'
        )
    if tokens.min() < 0 or tokens.max() >= len(ALPHABET):
        raise ValueError(f'{name}: base indices must lie in 0..{len(ALPHABET) - 1}')
    return tokens


def _same_length(generated: np.ndarray, other: np.ndarray, other_name: str) -> None:
    if generated.shape[1] != other.shape[1]:
        raise ValueError(f'generated sequences have length {generated.shape[1]}, {other_name} {other.shape[1]}')


def base_frequencies(tokens: np.ndarray) -> np.ndarray:
    """float64 [L, 4]: the share of the N sequences [N, L] with each base (columns in ALPHABET order) at each
    position; every row sums to 1."""
    tokens = _tokens(tokens, 'tokens')
    return np.stack([(tokens == base).mean(axis=0) for base in range(len(ALPHABET))], axis=1)


def base_frequency_error(generated: np.ndarray, reference: np.ndarray) -> float:
    """Mean over the L positions and 4 bases of |f_gen - f_ref|, f the `base_frequencies` [L, 4] of each set; 0 for
    equal composition at every position, at most 0.5 (each position's rows sum to 1). Lengths must match."""
    generated, reference = _tokens(generated, 'generated'), _tokens(reference, 'reference')
    _same_length(generated, reference, 'reference ones')
    return float(np.abs(base_frequencies(generated) - base_frequencies(reference)).mean())


def kmer_spectrum(tokens: np.ndarray, k: int, both_strands: bool = False) -> np.ndarray:
    """float64 [4**k]: the frequencies of the N * (L - k + 1) overlapping k-mers of the forward strands [N, L]
    (and of their reverse complements too with `both_strands`). The k-mer b_1 ... b_k (base indices) is entry
    sum_j b_j * 4**(k - j): a base-4 number, first base most significant, so for k = 2 'AC' is 1 and 'CA' is 4.
    Sums to 1."""
    tokens = _tokens(tokens, 'tokens')
    if both_strands:  # Complement = 3 - index (ALPHABET lists complements mirrored), read backwards.
        tokens = np.concatenate([tokens, len(ALPHABET) - 1 - tokens[:, ::-1]])
    if not 1 <= k <= tokens.shape[1]:
        raise ValueError(f'k must lie in 1..{tokens.shape[1]} (the sequence length), got {k}')
    # Horner's rule over the k shifted windows [N, L - k + 1] at once: code = code * 4 + next base.
    width = tokens.shape[1] - k + 1
    codes = np.zeros([tokens.shape[0], width], dtype=np.int64)
    for j in range(k):
        codes = codes * len(ALPHABET) + tokens[:, j : j + width]
    counts = np.bincount(codes.ravel(), minlength=len(ALPHABET) ** k)
    return counts / counts.sum()


def _kl_bits(p: np.ndarray, m: np.ndarray) -> float:
    """KL(p || m) = sum_i p_i log2(p_i / m_i) in bits, where m > 0 wherever p > 0; terms with p_i = 0 are 0."""
    keep = p > 0
    return float(np.sum(p[keep] * np.log2(p[keep] / m[keep])))


def kmer_js(generated: np.ndarray, reference: np.ndarray, k: int, both_strands: bool = False) -> float:
    """Jensen-Shannon divergence in bits of the k-mer spectra p, q of two sets of sequences:
    JS = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2. Symmetric; 0 for equal spectra, 1 for spectra with no
    k-mer in common. Lengths may differ."""
    p = kmer_spectrum(_tokens(generated, 'generated'), k, both_strands)
    q = kmer_spectrum(_tokens(reference, 'reference'), k, both_strands)
    m = (p + q) / 2
    return (_kl_bits(p, m) + _kl_bits(q, m)) / 2


@dataclasses.dataclass(frozen=True)
class KmerJS:
    """kmer_js for several k: `per_k` maps k to its JS (bits); `mean` is their plain mean."""

    mean: float
    per_k: dict[int, float]


def kmer_js_range(generated: np.ndarray, reference: np.ndarray, ks=(3, 4, 5, 6), both_strands: bool = False) -> KmerJS:
    """kmer_js for each k in `ks` and their mean. Short words (k = 3) test composition, longer ones (k = 6, 4,096
    words) motifs and codon context; at a fixed sample size the longer spectra also carry more sampling noise, so
    compare sets of equal size."""
    per_k = {int(k): kmer_js(generated, reference, k, both_strands) for k in ks}
    return KmerJS(float(np.mean(list(per_k.values()))), per_k)


def gc_content(tokens: np.ndarray) -> np.ndarray:
    """float64 [N]: the share of C and G among the L bases of each sequence [N, L]."""
    tokens = _tokens(tokens, 'tokens')
    return np.isin(tokens, (ALPHABET.index('C'), ALPHABET.index('G'))).mean(axis=1)


def gc_distance(generated: np.ndarray, reference: np.ndarray) -> float:
    """Wasserstein-1 distance between the GC contents (gc_content) of two sets of sequences: the integral over x of
    |F_gen(x) - F_ref(x)|, F the empirical distribution functions. In units of GC fraction (0.02 = two points of GC),
    0 for equal distributions; a shift of the mean by d costs d, and a too narrow or too wide spread costs too, which
    matters for DNA whose GC content varies along the genome while a Markov chain's concentrates. Chosen over the
    Kolmogorov-Smirnov statistic, which saturates at 1 once the supports separate, and which jumps at the atoms of
    GC content (multiples of 1 / L). Lengths may differ."""
    a, b = np.sort(gc_content(generated)), np.sort(gc_content(reference))
    points = np.union1d(a, b)
    # F_gen and F_ref are constant between consecutive points; sum |F_gen - F_ref| times each gap.
    cdf_a = np.searchsorted(a, points[:-1], side='right') / len(a)
    cdf_b = np.searchsorted(b, points[:-1], side='right') / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(points)))


def _rows_as_bytes(tokens: np.ndarray) -> np.ndarray:
    """Each row [L] of a uint8 array [N, L] as one opaque L-byte value [N], for exact whole-row comparisons."""
    rows = np.ascontiguousarray(tokens, dtype=np.uint8)
    return rows.view(np.dtype((np.void, rows.shape[1]))).ravel()


def memorised_fraction(generated: np.ndarray, training: np.ndarray) -> float:
    """Share of the generated sequences [N, L] equal, base for base, to some training sequence [M, L]; a sequence
    generated twice counts twice. Lengths must match."""
    generated, training = _tokens(generated, 'generated'), _tokens(training, 'training')
    _same_length(generated, training, 'training ones')
    return float(np.isin(_rows_as_bytes(generated), _rows_as_bytes(training)).mean())


def sequence_stats(
    generated: np.ndarray, reference: np.ndarray, training: np.ndarray | None = None, ks=(3, 4, 5, 6)
) -> dict[str, float]:
    """All of the above for generated sequences [N, L] against held-out reference ones [M, L]: 'base_freq_error',
    'kmer_js_<k>' for each k in `ks`, and 'memorised' (against the training set) when `training` is given."""
    stats = {'base_freq_error': base_frequency_error(generated, reference)}
    for k in ks:
        stats[f'kmer_js_{k}'] = kmer_js(generated, reference, k)
    if training is not None:
        stats['memorised'] = memorised_fraction(generated, training)
    return stats
