#!/usr/bin/env python3
"""Baseline for `engram bench`: the original implementation's hashing, in numpy.

The original (engram_demo_v1.py) hashes a whole [B, T] batch per layer with vectorized
int64 ops: shift the ids right by k (pad in front), multiply by the layer's odd
multipliers, XOR cumulatively per order, and take each head's prime modulus. This script
does the same ops on the same shapes as `engram bench` (V4.1 config: layers [1, 14],
orders 2-4, 8 heads, primes above 16,000,000, compressed vocab 99,092) and prints
tokens/s as JSON. The multipliers' values do not change the cost, so fixed odd ones are
used.
"""
import json
import time

import numpy as np

VOCAB = 99_092
MAX_N = 4
HEADS = 8
PAD = 2


def is_prime(n):
    if n < 2 or n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def layer_primes(start, seen):
    primes = []
    for _ in range(MAX_N - 1):
        s = 16_000_000 - 1
        order = []
        for _ in range(HEADS):
            p = s + 1
            while not is_prime(p) or p in seen:
                p += 1
            seen.add(p)
            order.append(p)
            s = p
        primes.append(order)
    return primes


def hash_layer(ids, mults, primes):
    b, t = ids.shape
    shifted = [ids]
    for k in range(1, MAX_N):
        shifted.append(np.pad(ids, ((0, 0), (k, 0)), constant_values=PAD)[:, :t])
    mix = shifted[0] * mults[0]
    out = []
    for n in range(2, MAX_N + 1):
        mix = np.bitwise_xor(mix, shifted[n - 1] * mults[n - 1])
        for p in primes[n - 2]:
            out.append(mix % p)
    return np.stack(out, axis=2)


def best_of(reps, f):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    seen = set()
    layers = [layer_primes(16_000_000, seen) for _ in (1, 14)]
    mults = np.array([76632096046245, 4839876093313, 35959672319349, 73987337458391], dtype=np.int64)
    rng = np.random.default_rng(1)
    t = 1 << 18
    ids = rng.integers(0, VOCAB, size=(1, t), dtype=np.int64)
    prefill = best_of(3, lambda: [hash_layer(ids, mults, p) for p in layers])
    # Decode-shaped: 64 sequences, one new token each per call (the last MAX_N ids given).
    seqs, steps = 64, 200
    window = rng.integers(0, VOCAB, size=(seqs, MAX_N), dtype=np.int64)

    def decode():
        for _ in range(steps):
            for p in layers:
                hash_layer(window, mults, p)[:, -1]

    dec = best_of(3, decode)
    print(json.dumps({
        "numpy_version": np.__version__,
        "numpy_hash_tokens_per_s": t / prefill,
        "numpy_hash_decode_tokens_per_s": seqs * steps / dec,
    }))


if __name__ == "__main__":
    main()
