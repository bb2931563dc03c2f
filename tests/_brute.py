"""Brute force over a classifier's tracked modules: per-example gradients, logit Jacobians, the
Gauss-Newton matrix and the Hessian, one example at a time through the model's own forward pass in
float64 (autograd calls in loops; nothing padded, batched or projected)."""
import torch

from instattr.layers.attributors import module_in
from instattr.layers.grads import FlatParameters, eager
from instattr.layers.projection import tracking
from instattr.models import classifier_for


class Brute:
    """Per-example quantities of a run's classifier over its tracked modules, one example at a time
    (float64 copy of the model, its own forward, nothing padded or batched)."""

    def __init__(self, run, layers=1, modules=None, classifier=None):
        self.clf = classifier or classifier_for(run)
        self.module = module_in(self.clf, "float64")
        self.tracked = self.clf.tracked(layers, modules)
        self.flat = FlatParameters(self.module, self.tracked, self.clf.final_name)
        self.penalized = torch.cat([torch.full((p.numel(),), any(p is q for q in self.flat.penalized))
                                    for p in self.flat.params])

    def batches(self, fs):
        rows = self.clf.rows(fs)
        return [rows.batch([i]) for i in range(len(fs))]

    def logits(self, b):
        return self.module(**b).logits[0]

    def grads(self, fs, labels):
        """(n, p) CE gradients at ``labels``."""
        out = []
        with tracking(self.module, self.flat.modules), torch.enable_grad():
            for b, y in zip(self.batches(fs), labels):
                loss = torch.nn.functional.cross_entropy(self.logits(b)[None], torch.tensor([int(y)]))
                out.append(self.flat.flatten(torch.autograd.grad(loss, self.flat.params)))
        return torch.stack(out)

    def jacobians(self, fs):
        """(n, C, p) d logits / d params, and (n, C) probabilities."""
        jac, probs = [], []
        with tracking(self.module, self.flat.modules), torch.enable_grad():
            for b in self.batches(fs):
                z = self.logits(b)
                jac.append(torch.stack([self.flat.flatten(torch.autograd.grad(z[c], self.flat.params,
                                                                             retain_graph=True))
                                        for c in range(len(z))]))
                probs.append(torch.softmax(z.detach(), -1))
        return torch.stack(jac), torch.stack(probs)

    def ggn(self, fs, l2, damping):
        """(1/n) sum J^T (diag p - p p^T) J + 2 l2 on the final layer + damping I."""
        jac, p = self.jacobians(fs)
        a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        h = torch.einsum("ncp,ncd,ndq->pq", jac, a, jac) / len(fs)
        return h + torch.diag(2 * l2 * self.penalized.double() + damping)

    def hessian(self, fs, labels, l2):
        """Hessian of mean CE + l2 ||final||^2 over the flat tracked parameters."""
        from torch.func import functional_call
        names = [n for n, _ in self.module.named_parameters()]
        tracked = [next(n for n, q in self.module.named_parameters() if q is p) for p in self.flat.params]
        assert set(tracked) <= set(names)
        theta0 = self.flat.flatten([p.detach() for p in self.flat.params])
        sizes = [p.numel() for p in self.flat.params]
        batches = self.batches(fs)

        def loss(theta):
            params = {n: t.view(p.shape) for n, t, p in zip(tracked, torch.split(theta, sizes), self.flat.params)}
            ce = sum(torch.nn.functional.cross_entropy(functional_call(self.module, params, kwargs=b).logits,
                                                       torch.tensor([int(y)])) for b, y in zip(batches, labels))
            pen = sum((params[n] ** 2).sum() for n, p in zip(tracked, self.flat.params)
                      if any(p is q for q in self.flat.penalized))
            return ce / len(batches) + l2 * pen
        with eager(self.module):                          # double backward: eager attention
            return torch.autograd.functional.hessian(loss, theta0, vectorize=True)   # one batched backward
