"""Gradient methods beyond the last layer: the final layers plus the top k transformer blocks, and TracIn.

One concern per module (after TRAK and kronfluence); what is model-specific is in
:mod:`instattr.models` (the tracked blocks, the top module, the checkpoints):

- :mod:`.cache`       hidden states entering the lowest tracked block, cached on disk per split
- :mod:`.grads`       exact per-example gradients and Hessian-vector products (torch.func)
- :mod:`.projection`  projected per-example gradients through forward/backward hooks
- :mod:`.gradcache`   projected training gradients cached on disk
- :mod:`.ihvp`        inverse-Hessian-vector products: LiSSA, explicit Hessian, Gauss-Newton
- :mod:`.attributors` ``gd-top``, ``gc-top``, ``if-top``, ``rif-top``
- :mod:`.tracin`      ``tracin`` (last layer) and ``tracin-top``

Importing :mod:`.attributors` and :mod:`.tracin` registers the methods (the method registry does
it on first use).
"""
from .ihvp import Curvature, ExplicitHessian, GaussNewton, InverseHVP, LiSSA

__all__ = ["Curvature", "ExplicitHessian", "GaussNewton", "InverseHVP", "LiSSA"]
