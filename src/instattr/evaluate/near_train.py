"""Near-training-example targets (paper Appendix D, Tables 3-4).

Targets are training examples themselves (their stored features) and three perturbations of
their text: insert a random vocabulary token at a random position (``add``), delete a random
token (``remove``; a one-word text keeps its word), replace a random token with a random
vocabulary token (``replace``); pairs are perturbed on both sides. Tokens are whitespace
tokens; the vocabulary is the training set's.
HIT@k = share of targets whose original training example ranks in the top k of the method's
scores; ties count in the original's favour (rank = number of strictly higher scores).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..arrays import FeatureSet
from ..errors import InstattrError
from ..store import Run
from .common import Ranker, data_name, fmt, fmt_paper, md_table, method_list, sample_rows, save
from .paper import TABLE3_4_NEAR_TRAIN, paper_columns
from .registry import evaluation

KINDS = ("train", "add", "remove", "replace")


def vocabulary(texts: Sequence[str]) -> List[str]:
    """Sorted distinct whitespace tokens of ``texts``."""
    return sorted({t for text in texts for t in text.split()})


def perturb(text: str, kind: str, vocab: Sequence[str], rng: np.random.Generator) -> str:
    """One random edit of ``text``: 'add', 'remove' or 'replace' a whitespace token ('train': unchanged)."""
    tokens = text.split()
    if kind == "train":
        return text
    if kind == "add":
        tokens.insert(int(rng.integers(len(tokens) + 1)), vocab[int(rng.integers(len(vocab)))])
    elif kind == "remove":
        if len(tokens) > 1:       # a one-word text keeps its word: removing it leaves nothing to classify
            del tokens[int(rng.integers(len(tokens)))]
    elif kind == "replace":
        if tokens:
            tokens[int(rng.integers(len(tokens)))] = vocab[int(rng.integers(len(vocab)))]
    else:
        raise InstattrError(f"unknown perturbation {kind!r}; expected one of {', '.join(KINDS)}")
    return " ".join(tokens)


def perturb_examples(documents: Sequence[str], queries: Optional[Sequence[str]], kind: str,
                     vocab: Sequence[str], rng: np.random.Generator) -> Tuple[List[str], Optional[List[str]]]:
    """Perturb every document (and every query, for pairs) independently."""
    docs, qs = [], ([] if queries is not None else None)
    for i, d in enumerate(documents):
        docs.append(perturb(d, kind, vocab, rng))
        if qs is not None:
            qs.append(perturb(queries[i], kind, vocab, rng))
    return docs, qs


def original_ranks(score_rows: np.ndarray, original_cols: np.ndarray) -> np.ndarray:
    """0-based rank of each row's original column: how many columns score strictly higher."""
    own = score_rows[np.arange(len(score_rows)), original_cols]
    return (score_rows > own[:, None]).sum(axis=1)


def hit_rates(ranks: np.ndarray, ks: Sequence[int] = (1, 10)) -> Dict[str, float]:
    """{'hit1': share of ranks < 1, 'hit10': share < 10, ...}."""
    ranks = np.asarray(ranks)
    return {f"hit{k}": float((ranks < k).mean()) if len(ranks) else float("nan") for k in ks}


def markdown(result: dict, columns: List[str]) -> str:
    kinds = result["kinds"]
    header = ["method"] + [f"{kind} HIT@{k}" for kind in kinds for k in (1, 10)]
    out = [f"# Near-training targets (paper Tables 3-4)\n\n{result['n_targets']} training examples and their "
           "perturbations as targets; HIT@k = share whose original training example ranks in the method's "
           "top k (fractions; the paper's percentages divided by 100).\n\nOurs:\n\n"]
    out.append(md_table(header, [[m] + [fmt(r[kind][f"hit{k}"]) for kind in kinds for k in (1, 10)]
                                 for m, r in result["methods"].items()]))
    for c in columns:
        table = TABLE3_4_NEAR_TRAIN[c]
        out.append(f"\nPaper ({'Table 3, SST' if c == 'SST' else 'Table 4, MNLI'}):\n\n")
        out.append(md_table(header, [[m] + [fmt_paper(table[m][kind][f"hit{k}"]) if m in table else "—"
                                            for kind in kinds for k in (1, 10)] for m in result["methods"]]))
    return "".join(out)


@evaluation("near-train", 50, "Recovering near-copies of training examples",
            "Targets are training examples and perturbed copies; HIT@1/HIT@10 is how often the original "
            "ranks first / in the top 10 (paper Tables 3-4).", quick={"n": 200}, flags=("--all",))
def run_near_train(run: Run, methods=None, seed: int = 0, n: int = 1000, all: bool = False,
                   kinds: Sequence[str] = KINDS, featurize: Optional[Callable] = None,
                   chunk_size: int = 256) -> dict:
    """HIT@1/HIT@10 of the original training example per method and perturbation; writes results/near-train.*.

    ``featurize(run, documents, queries=None, labels=None) -> FeatureSet`` encodes the perturbed
    texts (default :func:`instattr.pipeline.featurize`); ``all=True`` uses every training example.
    """
    if featurize is None:
        from ..pipeline import featurize
    names = method_list(methods)
    scorer = Ranker(run)
    train = scorer.train
    rng = np.random.default_rng(seed)
    cols = sample_rows(len(train), None if all else n, rng)
    examples = run.examples("train")              # the run's training rows, by idx
    chosen = [examples[i] for i in cols]
    is_pair = run.manifest.is_pair
    vocab = vocabulary([e.document for e in examples] + ([e.query for e in examples if e.query] if is_pair else []))
    targets: Dict[str, FeatureSet] = {}
    for kind in kinds:
        if kind == "train":
            targets[kind] = train.subset(cols)
            continue
        docs, qs = perturb_examples([e.document for e in chosen], [e.query for e in chosen] if is_pair else None,
                                    kind, vocab, rng)
        targets[kind] = featurize(run, docs, qs, [e.label for e in chosen])
    result = {"methods": {}, "kinds": list(kinds), "n_targets": len(cols), "seed": seed}
    for m in names:
        att = scorer.attributor(m)
        result["methods"][m] = {}
        for kind, fs in targets.items():
            ranks = np.concatenate([original_ranks(block, cols[rows])
                                    for rows, block in att.score_chunks(fs, chunk_size)]) if len(fs) else []
            result["methods"][m][kind] = hit_rates(ranks)
    return save(run, "near-train", result, markdown(result, paper_columns(data_name(run))))
