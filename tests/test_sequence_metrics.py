"""metrics/sequence_metrics.py against numbers worked out by hand on tiny sets of sequences."""

import math

import numpy as np
import pytest

from metrics import sequence_metrics as sm
from training import sequences


def tok(*seqs):
    return sequences.encode(list(seqs))


def test_base_frequencies_and_error_by_hand():
    # Position by position, (A, C, G, T) shares:
    #   ACG, AAT: pos 0 A A -> (1, 0, 0, 0); pos 1 C A -> (.5, .5, 0, 0); pos 2 G T -> (0, 0, .5, .5)
    #   ACG, CCG: pos 0 A C -> (.5, .5, 0, 0); pos 1 C C -> (0, 1, 0, 0); pos 2 G G -> (0, 0, 1, 0)
    generated, reference = tok('ACG', 'AAT'), tok('ACG', 'CCG')
    expected = [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]
    np.testing.assert_array_equal(sm.base_frequencies(generated), expected)
    assert sm.base_frequencies(generated).dtype == np.float64
    # |differences|: (.5, .5, 0, 0), (.5, .5, 0, 0), (0, 0, .5, .5): 6 entries of .5 among 12, mean 0.25.
    assert sm.base_frequency_error(generated, reference) == 0.25
    assert sm.base_frequency_error(generated, generated) == 0
    with pytest.raises(ValueError, match='length 3, reference ones 4'):
        sm.base_frequency_error(generated, tok('ACGT'))


def test_kmer_spectrum_by_hand():
    # Overlapping 2-mers: ACGT -> AC, CG, GT; AAAC -> AA, AA, AC. Six in all: AA 2, AC 2, CG 1, GT 1.
    # Index = 4 * first + second: AA 0, AC 1, CG 4 + 2 = 6, GT 8 + 3 = 11 (first base most significant).
    spectrum = sm.kmer_spectrum(tok('ACGT', 'AAAC'), 2)
    expected = np.zeros(16)
    expected[[0, 1, 6, 11]] = [2 / 6, 2 / 6, 1 / 6, 1 / 6]
    np.testing.assert_allclose(spectrum, expected, rtol=0, atol=1e-15)
    assert spectrum.dtype == np.float64 and spectrum.sum() == pytest.approx(1, abs=1e-15)
    # 3-mers of 'CAT': one, C A T = 1 * 16 + 0 * 4 + 3 = 19; 1-mers are the base composition.
    np.testing.assert_array_equal(np.flatnonzero(sm.kmer_spectrum(tok('CAT'), 3)), [19])
    np.testing.assert_array_equal(sm.kmer_spectrum(tok('ACGT', 'AAAC'), 1), [4 / 8, 2 / 8, 1 / 8, 1 / 8])
    with pytest.raises(ValueError, match='k must lie in 1..4'):
        sm.kmer_spectrum(tok('ACGT'), 5)


def test_kmer_spectrum_sums_to_one_and_matches_a_count():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 4, size=(50, 20), dtype=np.uint8)
    for k in (1, 3, 6):
        spectrum = sm.kmer_spectrum(tokens, k)
        assert spectrum.shape == (4**k,) and spectrum.sum() == pytest.approx(1, abs=1e-12)
    # The 4-mer ACGT, counted in the strings.
    text = sequences.decode(tokens)
    count = sum(s[i : i + 4] == 'ACGT' for s in text for i in range(17))
    assert sm.kmer_spectrum(tokens, 4)[0 * 64 + 1 * 16 + 2 * 4 + 3] == count / (50 * 17)


def test_kmer_js_by_hand():
    # 1-mers: p = (1/2, 1/2, 0, 0) for 'AC', q = (1, 0, 0, 0) for 'AA', m = (3/4, 1/4, 0, 0).
    # KL(p||m) = 1/2 log2((1/2) / (3/4)) + 1/2 log2((1/2) / (1/4)) = 1/2 (1 - log2 3) + 1/2 = 1 - 1/2 log2 3;
    # KL(q||m) = 1 log2(1 / (3/4)) = 2 - log2 3; the zero entries of p and q contribute nothing.
    # JS = (KL(p||m) + KL(q||m)) / 2 = 3/2 - 3/4 log2 3 = 0.31128...
    assert sm.kmer_js(tok('AC'), tok('AA'), 1) == pytest.approx(1.5 - 0.75 * math.log2(3), abs=1e-12)


def test_kmer_js_identical_disjoint_symmetric():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, size=(40, 16), dtype=np.uint8)
    b = rng.integers(0, 2, size=(30, 12), dtype=np.uint8)  # Only A and C, and another length.
    assert sm.kmer_js(a, a.copy(), 3) == 0
    assert sm.kmer_js(tok('AAAA', 'AAAA'), tok('CCCC'), 2) == 1  # AA only vs CC only: no 2-mer in common.
    assert sm.kmer_js(tok('ACAC'), tok('GTGT'), 3) == 1
    assert sm.kmer_js(a, b, 3) == pytest.approx(sm.kmer_js(b, a, 3), abs=1e-15)
    assert 0 < sm.kmer_js(a, b, 3) < 1


def test_memorised_fraction_constructed():
    training = tok('ACGT', 'AAAA', 'CCCC')
    # ACGT and CCCC are copies (ACGT twice, counted twice); ACGA differs in one base; CGTA is ACGT shifted.
    generated = tok('ACGT', 'ACGA', 'CCCC', 'ACGT', 'CGTA')
    assert sm.memorised_fraction(generated, training) == 3 / 5
    assert sm.memorised_fraction(training, training) == 1
    assert sm.memorised_fraction(tok('GGGG'), training) == 0
    with pytest.raises(ValueError, match='training ones 4'):
        sm.memorised_fraction(tok('ACG'), training)


def test_memorised_fraction_is_fast_on_a_large_set():
    rng = np.random.default_rng(3)
    training = rng.integers(0, 4, size=(100_000, 128), dtype=np.uint8)
    generated = rng.integers(0, 4, size=(100_000, 128), dtype=np.uint8)
    generated[::4] = training[1::4]  # 25,000 copies.
    assert sm.memorised_fraction(generated, training) == 0.25


def test_sequence_stats_collects_the_metrics():
    rng = np.random.default_rng(4)
    generated, reference, training = (rng.integers(0, 4, size=(20, 10), dtype=np.uint8) for _ in range(3))
    stats = sm.sequence_stats(generated, reference, training)
    assert list(stats) == ['base_freq_error', 'kmer_js_3', 'kmer_js_4', 'kmer_js_5', 'kmer_js_6', 'memorised']
    assert stats['base_freq_error'] == sm.base_frequency_error(generated, reference)
    assert stats['kmer_js_5'] == sm.kmer_js(generated, reference, 5)
    assert stats['memorised'] == sm.memorised_fraction(generated, training)
    assert list(sm.sequence_stats(generated, reference, ks=(2,))) == ['base_freq_error', 'kmer_js_2']


@pytest.mark.parametrize(
    'tokens, message',
    [
        (np.zeros([3], np.uint8), 'expected base indices'),
        (np.zeros([0, 4], np.uint8), 'expected base indices'),
        (np.zeros([2, 4], np.float32), 'expected base indices'),
        (np.full([2, 4], 4, np.uint8), 'must lie in 0..3'),
    ],
)
def test_bad_tokens_are_refused(tokens, message):
    with pytest.raises(ValueError, match=message):
        sm.base_frequencies(tokens)


def test_gc_content_and_distance_by_hand():
    np.testing.assert_array_equal(sm.gc_content(tok('ACGT', 'GGCC', 'ATAT')), [0.5, 1, 0])
    # GC 1 against {0, 0.25}: half the mass moves by 1, half by 0.75.
    assert sm.gc_distance(tok('CGCG'), tok('ATAT', 'ACTT')) == pytest.approx(0.875)
    assert sm.gc_distance(tok('ATAT', 'ACTT'), tok('CGCG')) == pytest.approx(0.875)
    # {0.5, 0.5} against {0, 1}: each half moves by 0.5.
    assert sm.gc_distance(tok('ACGT', 'CAGT'), tok('ATAT', 'GCGC')) == pytest.approx(0.5)
    assert sm.gc_distance(tok('ACGT', 'TTTT'), tok('TTTT', 'ACGT', 'TTTT', 'ACGT')) == 0
    # Lengths may differ: GC 0.5 against 0.25 and 0.75 (length 4 and 8).
    assert sm.gc_distance(tok('ACGT'), tok('ACTTTTTT', 'ACGTACGG')) == pytest.approx(0.25)


def test_kmer_js_range_and_both_strands():
    a, b = tok('AAAA', 'ACGT'), tok('CCGA', 'TTGA')
    js = sm.kmer_js_range(a, b, ks=(1, 2, 3))
    assert js.per_k == {k: sm.kmer_js(a, b, k) for k in (1, 2, 3)}
    assert js.mean == pytest.approx(np.mean(list(js.per_k.values())))
    # 'AAAA' on both strands: 'AAAA' and 'TTTT', so A and T at 1/2 each.
    np.testing.assert_array_equal(sm.kmer_spectrum(tok('AAAA'), 1, both_strands=True), [0.5, 0, 0, 0.5])
    # A set and its reverse complements have one strand-symmetric spectrum.
    assert sm.kmer_js(tok('AACG'), tok('CGTT'), 2, both_strands=True) == 0
    assert sm.kmer_js(tok('AACG'), tok('CGTT'), 2) > 0


def test_markov_chain_reproduces_a_planted_chain():
    from metrics.sequence_baselines import MarkovChain, PositionModel

    rng = np.random.default_rng(0)
    planted = MarkovChain(2, rng.dirichlet(np.ones(4), size=16), rng.integers(0, 4, size=(50, 2)).astype(np.uint8))
    tokens = planted.sample(20_000, 40, np.random.default_rng(1))
    assert tokens.dtype == np.uint8 and tokens.shape == (20_000, 40)
    fit = MarkovChain.fit(tokens, 2, pseudocount=0.5)
    # 760,000 transitions, about 47,500 per context: standard errors below 0.0025.
    np.testing.assert_allclose(fit.transition, planted.transition, atol=0.01)
    assert np.isin(sequences_as_bytes(fit.prefixes), sequences_as_bytes(planted.prefixes)).all()
    # Same seed, same samples; order 0 is the overall base composition.
    np.testing.assert_array_equal(
        fit.sample(5, 40, np.random.default_rng(2)), fit.sample(5, 40, np.random.default_rng(2))
    )
    zero = MarkovChain.fit(tokens, 0, pseudocount=0)
    np.testing.assert_allclose(zero.transition[0], sm.base_frequencies(tokens).mean(axis=0))
    # Add-one smoothing: a context never followed by G still can be.
    one = MarkovChain.fit(tok('AAAA'), 1)
    np.testing.assert_allclose(one.transition[0], [4 / 7, 1 / 7, 1 / 7, 1 / 7])
    np.testing.assert_allclose(one.transition[1], [0.25] * 4)
    # The position model draws each position from its column of base frequencies.
    model = PositionModel.fit(tok('ACGT', 'ACGA', 'CCGA', 'TCGA'))
    freqs = sm.base_frequencies(model.sample(40_000, np.random.default_rng(3)))
    np.testing.assert_allclose(freqs, model.freqs, atol=0.01)
    np.testing.assert_array_equal(model.freqs[1:3], [[0, 1, 0, 0], [0, 0, 1, 0]])


def sequences_as_bytes(tokens):
    return [bytes(row) for row in np.asarray(tokens, dtype=np.uint8)]
