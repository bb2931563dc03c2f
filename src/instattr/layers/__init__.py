"""Gradient methods beyond the last layer: the head plus the top k encoder layers, and TracIn.

One concern per module (after TRAK and kronfluence):

- :mod:`.network`     the tracked model (top layers + pooling + head) built from a run; checkpoints
- :mod:`.cache`       hidden states entering the lowest tracked layer, cached on disk per split
- :mod:`.grads`       exact per-example gradients and Hessian-vector products (torch.func)
- :mod:`.projection`  LoGra-style projected per-example gradients through forward/backward hooks
- :mod:`.ihvp`        inverse-Hessian-vector products: LiSSA, explicit Hessian, Gauss-Newton
- :mod:`.attributors` ``gd-top``, ``gc-top``, ``if-top``, ``rif-top``
- :mod:`.tracin`      ``tracin`` (last layer) and ``tracin-top``

Importing this package registers the methods.
"""
from . import attributors, tracin  # noqa: F401  (register the methods)
from .ihvp import Curvature, ExplicitHessian, GaussNewton, InverseHVP, LiSSA

__all__ = ["Curvature", "ExplicitHessian", "GaussNewton", "InverseHVP", "LiSSA"]
