"""The DNA sanity table: which sequence metrics can tell real DNA from trivial generators, on one DNA domain.

Every row is scored against the domain's training sequences with the same number N of sequences: held-out real ones
(a random N of them per seed), the per-position base-frequency model and Markov chains of order 0, 1, 3 and 5 fit on
the training sequences (metrics/sequence_baselines.py), one sample per seed. Metrics (metrics/sequence_metrics.py):
k-mer Jensen-Shannon divergence for each k of --ks (3..6) and their mean, GC-content distance (Wasserstein-1),
per-position base-frequency error, memorised fraction, and FD-ARS (metrics/dna_detector.py) on ARS. A metric is USABLE
on a domain when it puts held-out real below every trivial generator and orders the chains M0 > M1 > M3 > M5 (a
higher order is closer to real DNA), each comparison separated: the two rows' mean +- standard deviation over seeds
do not overlap. Domains:
- ars: the ARS1 yeast library (a mutational scan of one sequence), centre 128 nt; training = the 20,000 sequences of
  the benchmarks' data set (bench/common.py DATASET_SOURCES['dna']), held out = the ARS test split;
- ecoli: E. coli K-12 windows of 128 nt on both strands with --stride, split by position (the last 10 % of the
  chromosome held out; training/sequences.py genome_windows).
Writes OUT/sanity.md and OUT/sanity.json. Numpy and the FD-ARS detector only; under a minute on one CPU core (docs/dna.md, "Sanity tables").
"""

import json
import os
import time

import click
import numpy as np

from bench.common import apply_quick, fmt, markdown_table
from metrics import sequence_metrics as sm
from metrics.sequence_baselines import MarkovChain, PositionModel
from training import sequences

LENGTH = 128
ARS_TRAIN = 20_000  # As bench/common.py's DATASET_SOURCES['dna'].
TEST_FRACTION = 0.1
ORDERS = (0, 1, 3, 5)
ROWS = ('held-out real', 'per-position', *(f'Markov {k}' for k in ORDERS))
QUICK = dict(num=300)


def load_domain(domain: str, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(training tokens [M, 128], held-out tokens [M', 128]) of a domain."""
    if domain == 'ars':
        _, seqs, _ = sequences.read_ars()
        train_rows = sequences.split_indices(len(seqs), 'train')[:ARS_TRAIN]
        test_rows = sequences.split_indices(len(seqs), 'test')[:ARS_TRAIN]
        return tuple(sequences.encode([seqs[i] for i in rows], length=LENGTH) for rows in (train_rows, test_rows))
    genome = sequences.read_source('ecoli')[1]
    return tuple(sequences.genome_windows(genome, LENGTH, stride, s, TEST_FRACTION)[0] for s in ('train', 'test'))


def fd_ars_scorer(train: np.ndarray):
    """FD-ARS against `train`, its features computed once: tokens [N, 128] -> float."""
    from metrics.dna_detector import load_dna_detector, tokens_to_net_input
    from metrics.frechet import FeatureStats, frechet_distance

    detector = load_dna_detector('cpu')

    def moments(tokens):
        stats = FeatureStats()
        for start in range(0, len(tokens), 1000):
            stats.append(detector(tokens_to_net_input(tokens[start : start + 1000])))
        return stats.mu, stats.sigma

    reference = moments(train)
    return lambda tokens: frechet_distance(*moments(tokens), *reference)


def draw(row: str, train: np.ndarray, held_out: np.ndarray, num: int, seed: int, models: dict) -> np.ndarray:
    """`num` sequences of one row of the table, seeded."""
    rng = np.random.default_rng(seed)
    if row == 'held-out real':
        return held_out[rng.choice(len(held_out), size=num, replace=False)]
    if row == 'per-position':
        return models[row].sample(num, rng)
    return models[row].sample(num, train.shape[1], rng)


def score(tokens: np.ndarray, train: np.ndarray, ks: tuple[int, ...], fd_ars) -> dict[str, float]:
    js = sm.kmer_js_range(tokens, train, ks)
    out = {f'kmer_js_{k}': v for k, v in js.per_k.items()}
    out['kmer_js_mean'] = js.mean
    out['gc_distance'] = sm.gc_distance(tokens, train)
    out['base_freq_error'] = sm.base_frequency_error(tokens, train)
    out['memorised'] = sm.memorised_fraction(tokens, train)
    if fd_ars is not None:
        out['fd_ars'] = fd_ars(tokens)
    return out


def usability(summary: dict) -> tuple[bool, str]:
    """Whether one metric's {row: (mean, sd)} ranks held-out real below every generator and M0 > M1 > M3 > M5, each
    pair separated by more than the two standard deviations; the reason when it does not."""
    failures = []

    def below(a, b):
        (ma, sa), (mb, sb) = summary[a], summary[b]
        if not ma + sa < mb - sb:
            failures.append(f'{a} ({fmt(ma)} ± {fmt(sa, 2)}) not below {b} ({fmt(mb)} ± {fmt(sb, 2)})')

    for row in ROWS[1:]:
        below('held-out real', row)
    for low, high in zip(ORDERS[1:], ORDERS[:-1]):
        below(f'Markov {low}', f'Markov {high}')
    more = f'; and {len(failures) - 2} more' if len(failures) > 2 else ''
    return not failures, '; '.join(failures[:2]) + more if failures else 'ranks every row as required'


def parse_ks(value) -> tuple[int, ...]:
    """--ks: comma-separated word lengths, sorted and unique, each 1..12."""
    try:
        ks = tuple(sorted({int(v) for v in str(value).split(',') if v.strip()}))
    except ValueError:
        raise click.BadParameter(f'expected comma-separated integers, got "{value}"') from None
    if not ks or not 1 <= ks[0] <= ks[-1] <= 12:
        raise click.BadParameter(f'need k between 1 and 12, got "{value}"')
    return ks


def summarise(values: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """{metric: {row: (mean, sample standard deviation over seeds)}} of {row: [one score dict per seed]}."""
    metrics = list(values[ROWS[0]][0])
    return {m: {row: (float(np.mean([v[m] for v in values[row]])), float(np.std([v[m] for v in values[row]], ddof=1)))
                for row in ROWS} for m in metrics}  # fmt: skip


def render(domain: str, sizes: tuple[int, int], num: int, seeds: int, summary: dict, verdicts: dict, wall) -> str:
    """The markdown of sanity.md: one line on the sets, the table, one line per metric on its usability."""
    cell = lambda m, row: f'{fmt(summary[m][row][0])} ± {fmt(summary[m][row][1], 2)}'  # noqa: E731
    table = markdown_table(['row', *summary], [[row, *(cell(m, row) for m in summary)] for row in ROWS])
    lines = [f'- {m}: **{"usable" if ok else "not usable"}**: {why}' for m, (ok, why) in verdicts.items()]
    return (
        f'{domain}: {sizes[0]} training and {sizes[1]} held-out sequences of {LENGTH} nt; N = {num} per row, '
        f'{seeds} seeds (mean ± sd); wall time {wall:.1f} s\n\n{table}\n\n' + '\n'.join(lines) + '\n'
    )


# fmt: off
@click.command()
@click.option('--domain', help='DNA domain', type=click.Choice(['ars', 'ecoli']), required=True)
@click.option('--out',    help='Output folder', metavar='DIR', type=str, required=True)
@click.option('--num',    help='Sequences per row and seed', metavar='INT', type=click.IntRange(min=2), default=2000, show_default=True)
@click.option('--seeds',  help='Seeds per row', metavar='INT', type=click.IntRange(min=2), default=3, show_default=True)
@click.option('--stride', help='ecoli: bases between window starts', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--ks',     help='k of the k-mer JS columns', metavar='LIST', type=parse_ks, default='3,4,5,6', show_default=True)
@click.option('--quick',  help='Smoke test: --num=300 unless given', is_flag=True)
# fmt: on
def main(domain: str, out: str, num: int, seeds: int, stride: int, ks: tuple[int, ...], quick: bool):
    """The DNA sanity table of one domain: held-out real vs trivial generators under each sequence metric."""
    start_time = time.time()
    opts = dict(num=num)
    if quick:
        apply_quick(click.get_current_context(), opts, QUICK)
    num = opts['num']
    if domain == 'ars' and click.get_current_context().get_parameter_source('stride').name != 'DEFAULT':
        raise click.ClickException('--stride applies to --domain=ecoli')
    try:
        train, held_out = load_domain(domain, stride)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if len(held_out) < num:
        raise click.ClickException(f'{len(held_out)} held-out sequences, fewer than --num={num}')
    models = {'per-position': PositionModel.fit(train)} | {f'Markov {k}': MarkovChain.fit(train, k) for k in ORDERS}
    fd_ars = fd_ars_scorer(train) if domain == 'ars' else None
    values = {
        row: [score(draw(row, train, held_out, num, s, models), train, ks, fd_ars) for s in range(seeds)]
        for row in ROWS
    }
    summary = summarise(values)
    verdicts = {m: usability(summary[m]) for m in summary}
    wall = time.time() - start_time
    text = render(domain, (len(train), len(held_out)), num, seeds, summary, verdicts, wall)
    click.echo(text)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'sanity.md'), 'w', encoding='utf-8') as f:
        f.write(text)
    record = dict(
        domain=domain, num=num, seeds=seeds, stride=stride if domain == 'ecoli' else None, ks=list(ks),
        train_size=len(train), held_out_size=len(held_out), wall_seconds=wall, values=values,
        summary={m: {row: dict(mean=ms[0], sd=ms[1]) for row, ms in s.items()} for m, s in summary.items()},
        usable={m: dict(usable=ok, reason=why) for m, (ok, why) in verdicts.items()},
    )  # fmt: skip
    with open(os.path.join(out, 'sanity.json'), 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=2)


if __name__ == '__main__':
    main()
