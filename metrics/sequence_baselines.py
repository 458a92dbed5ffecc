"""Trivial DNA generators, the floor a diffusion model must beat before its sequence metrics mean anything.

A metric of generated DNA (metrics/sequence_metrics.py, FD-ARS) is worth reporting only if it ranks held-out real
sequences above these, and richer models above poorer ones (bench/dna_sanity.py checks this):
- `PositionModel`: every position drawn on its own from the training sequences' base frequencies at that position
  (exact per-position composition, no dependence between positions);
- `MarkovChain` of order k: each base drawn given the k before it, transition probabilities counted over the
  training sequences with a pseudocount (add-one by default), the first k bases copied from a random training
  sequence's first k. Order 0 is the overall base composition.
All are fit on base indices uint8 [N, L] (values 0..3 indexing 'ACGT') and sample from a numpy Generator, so a seed
fixes the samples. Imports numpy only.
"""

import dataclasses

import numpy as np

__all__ = ['PositionModel', 'MarkovChain']

NUM_BASES = 4


def _draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of probabilities [..., 4] (inverse CDF of one uniform each), int64 [...]."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[:-1])[..., np.newaxis] * cdf[..., -1:]
    return np.minimum((u >= cdf).sum(axis=-1), NUM_BASES - 1)


@dataclasses.dataclass(frozen=True)
class PositionModel:
    """Independent positions: `freqs` [L, 4], the share of each base at each position of the training sequences."""

    freqs: np.ndarray

    @classmethod
    def fit(cls, tokens: np.ndarray) -> 'PositionModel':
        tokens = np.asarray(tokens)
        return cls(np.stack([(tokens == b).mean(axis=0) for b in range(NUM_BASES)], axis=1))

    def sample(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """uint8 [num, L]."""
        return _draw(np.broadcast_to(self.freqs, (num, *self.freqs.shape)), rng).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class MarkovChain:
    """Order-k chain: `transition` [4**k, 4] holds P(next base | the k bases before it), the context read as a
    base-4 number (first base most significant, as metrics.sequence_metrics.kmer_spectrum); `prefixes` [M, k] are the
    first k bases of the training sequences, of which `sample` copies one at random per sequence."""

    order: int
    transition: np.ndarray
    prefixes: np.ndarray

    @classmethod
    def fit(cls, tokens: np.ndarray, order: int, pseudocount: float = 1.0) -> 'MarkovChain':
        """Count every (k bases, next base) pair inside each training sequence [N, L] (none across two sequences),
        add `pseudocount` to every count and normalise each context's row."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if not 0 <= order < tokens.shape[1]:
            raise ValueError(f'order must lie in 0..{tokens.shape[1] - 1} (below the length), got {order}')
        width = tokens.shape[1] - order
        context = np.zeros([tokens.shape[0], width], dtype=np.int64)
        for j in range(order):  # Horner's rule over the shifted windows, as kmer_spectrum.
            context = context * NUM_BASES + tokens[:, j : j + width]
        pairs = context * NUM_BASES + tokens[:, order:]
        counts = np.bincount(pairs.ravel(), minlength=NUM_BASES ** (order + 1)).reshape(-1, NUM_BASES)
        counts = counts + pseudocount
        return cls(order, counts / counts.sum(axis=1, keepdims=True), tokens[:, :order].astype(np.uint8))

    def sample(self, num: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """uint8 [num, length]: a copied training prefix, then one base at a time given the `order` before it."""
        out = np.empty([num, length], dtype=np.int64)
        k = min(self.order, length)
        out[:, :k] = self.prefixes[rng.integers(0, len(self.prefixes), size=num), :k]
        context = np.zeros(num, dtype=np.int64)
        for j in range(k):
            context = context * NUM_BASES + out[:, j]
        modulus = NUM_BASES**self.order
        for t in range(k, length):
            out[:, t] = _draw(self.transition[context], rng)
            context = (context * NUM_BASES + out[:, t]) % modulus  # Drop the oldest base; 0 for order 0.
        return out.astype(np.uint8)
