"""instattr: which training examples made my model predict this?

    >>> import instattr
    >>> run = instattr.Run.load("runs/sst2")
    >>> run.features("test").probs.shape
    >>> explainer = instattr.Explainer(model, tokenizer, train=rows)      # models in memory
    >>> explainer.explain("a gorgeous, witty, seductive movie", k=5).to_frame()

``import instattr`` loads numpy only; ``Explainer`` (torch, transformers) is imported on first use.
"""
from .arrays import FeatureSet, FinalLayer
from .store import Run
from .version import __version__

__all__ = ["Run", "FeatureSet", "FinalLayer", "Explainer", "__version__"]


def __getattr__(name):
    if name == "Explainer":
        from .explainer import Explainer
        return Explainer
    raise AttributeError(f"module 'instattr' has no attribute {name!r}")
