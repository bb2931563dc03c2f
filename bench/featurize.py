"""Encoding throughput: length-sorted batches against unsorted batches of the same data, one process.

    python bench/featurize.py [--data sst2] [--n 2000] [--batch-size 64]

Prints sentences/s and tokens/s of both paths and their ratio (the machine is shared: compare the
ratio, not the absolute seconds). Both paths are checked to give the same embeddings.
"""
import argparse
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    from instattr.data import load_dataset
    from instattr.encoders import Encoder
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    split = load_dataset(a.data).splits["train"].limit(a.n)
    texts = [e.document for e in split.examples]
    queries = [e.query for e in split.examples] if split.is_pair else None
    enc = Encoder(batch_size=a.batch_size)
    ids, _ = enc.tokenize(texts, queries)
    tokens = sum(len(x) for x in ids)
    enc.encode(texts[:64], queries[:64] if queries else None, progress=False)  # warm-up
    best, out = {}, {}
    for _ in range(a.repeats):  # interleaved, so drift on a shared machine hits both paths alike
        for sort in (True, False):
            t = time.perf_counter()
            out[sort] = enc.encode(texts, queries, sort=sort, progress=False)
            best[sort] = min(best.get(sort, np.inf), time.perf_counter() - t)
    diff = float(np.abs(out[True] - out[False]).max())
    print(f"{a.data}: {len(texts)} examples, {tokens} tokens, batch {a.batch_size}, best of {a.repeats}")
    for sort, name in ((True, "length-sorted"), (False, "unsorted")):
        print(f"  {name:<14} {len(texts) / best[sort]:8.1f} sentences/s {tokens / best[sort]:9.0f} tokens/s")
    print(f"  speed-up of sorting: {best[False] / best[True]:.2f}x   (max |difference| of embeddings {diff:.1e})")


if __name__ == "__main__":
    main()
