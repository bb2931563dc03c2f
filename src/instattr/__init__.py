"""instattr: which training examples made my model predict this?

    >>> import instattr
    >>> run = instattr.Run.load("runs/sst2")
    >>> run.features("test").probs.shape
"""
__version__ = "0.1.0"

from .arrays import FeatureSet, FinalLayer
from .store import Run  # noqa: E402

__all__ = ["Run", "FeatureSet", "FinalLayer", "__version__"]
