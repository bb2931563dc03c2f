"""Gradient methods over tracked modules inside the model's own forward pass (the top blocks and
the head by default, an adapter's trained modules, or ``--modules``), and their TracIn.

One concern per module (after TRAK and kronfluence); what is model-specific is in
:mod:`instattr.models` (the model's forward as a module, which linear modules are tracked, the
checkpoints) and what is attributed in :mod:`instattr.task`:

- :mod:`.projection`  projected per-example gradients through forward hooks on the tracked modules
- :mod:`.grads`       exact per-example gradients and Hessian-vector products (autograd, one example at a time)
- :mod:`.gradcache`   projected training gradients cached on disk
- :mod:`.ihvp`        inverse-Hessian-vector products: LiSSA, explicit Hessian, Gauss-Newton
- :mod:`.attributors` ``gd-top``, ``gc-top``, ``if-top``, ``rif-top``
- :mod:`.tracin`      ``tracin-top`` (the last layer's ``tracin`` is :mod:`instattr.methods.tracin`)

Importing :mod:`.attributors` and :mod:`.tracin` registers the methods (the method registry does
it on first use).
"""
from .ihvp import Curvature, ExplicitHessian, GaussNewton, InverseHVP, LiSSA

__all__ = ["Curvature", "ExplicitHessian", "GaussNewton", "InverseHVP", "LiSSA"]
