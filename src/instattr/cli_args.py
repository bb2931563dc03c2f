"""The command line's shared arguments: their definitions and the configs built from them.

Kept apart from :mod:`.cli` so that the commands defined elsewhere (:mod:`.cli_index`) use the same
flags without importing the command line itself.
"""
from __future__ import annotations

import argparse

from .errors import InstattrError


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="sst2", help="sst2|mnli|hans, a dataset folder, or a HF dataset name")
    p.add_argument("--data-root", help="folder holding named datasets (default: $INSTATTR_DATA, ./data, "
                   "../shared/data, "
                   "then the packaged copy)")
    p.add_argument("--text-field", help="column or key of the text (default: document, text, sentence, premise)")
    p.add_argument("--query-field", help="column or key of a pair's second text (default: query, hypothesis)")
    p.add_argument("--label-field", help="column or key of the label (default: label, labels)")
    p.add_argument("--encoder", help="HF name or local path (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--pooling", choices=["mean", "cls"])
    p.add_argument("--pairs", dest="pair_mode", choices=["siamese", "cross"],
                   help="how sentence pairs are encoded (default: siamese in head mode, cross in finetune)")
    p.add_argument("--mode", choices=["head", "finetune"], default="head")
    p.add_argument("--max-length", type=int, help="tokens per example (default 128; an imported model: its "
                   "tokenizer's maximum)")
    p.add_argument("--l2", type=float, help="L2 coefficient on the linear weight (default 0.01)")
    p.add_argument("--lr", type=float, help="head learning rate (default 2e-4)")
    p.add_argument("--epochs", type=int, help="head epochs (default 3)")
    p.add_argument("--batch-size", type=int, help="head batch size (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int)
    p.add_argument("--limit-eval", type=int)
    p.add_argument("--tune", action="store_true", help="grid-search l2, lr, epochs, batch size on dev")
    p.add_argument("--finetune-lr", type=float, default=2e-5, help="finetune mode: the encoder's learning rate "
                   "(the layers above it take --lr)")
    p.add_argument("--finetune-epochs", type=int, default=1)
    device_arg(p)


def device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda: where encoding, training, "
                   "fine-tuning, layered gradients and retraining run")


def train_config(a):
    """TrainConfig from parsed arguments."""
    from dataclasses import replace

    from .models.head import HeadConfig
    from .pipeline import TrainConfig
    head = HeadConfig(seed=a.seed)
    overrides = {k: getattr(a, k) for k in ("l2", "lr", "epochs", "batch_size") if getattr(a, k) is not None}
    head = replace(head, **overrides)
    for k in ("limit_train", "limit_eval", "max_length", "epochs", "batch_size"):
        v = getattr(a, k)
        if v is not None and v <= 0:
            raise InstattrError(f"--{k.replace('_', '-')} must be positive, got {v}")
    return TrainConfig(data=a.data, data_root=a.data_root, text_field=a.text_field, query_field=a.query_field,
                       label_field=a.label_field, encoder=a.encoder, pooling=a.pooling,
                       pair_mode=a.pair_mode, mode=a.mode, max_length=a.max_length or 128, head=head,
                       limit_train=a.limit_train, limit_eval=a.limit_eval, tune=a.tune,
                       finetune_lr=a.finetune_lr, finetune_epochs=a.finetune_epochs, device=a.device)


def import_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, metavar="CKPT", help="an AutoModelForSequenceClassification "
                   "checkpoint folder (save_pretrained), or a PEFT adapter folder over one"
                   + ("" if required else "; import it instead of training"))
    p.add_argument("--damping", type=float, default=0.01, help="stands in for the L2 penalty the model was not "
                   "trained with: the 2*damping*I of the closed forms' Hessian and representer points' refit "
                   "(default 0.01, the L2 instattr trains heads with); recorded in run.json")
    p.add_argument("--sbert", help="untuned sentence encoder of the sbert-* baselines (default: packaged "
                   "all-MiniLM-L6-v2)")
    p.add_argument("--final-layer", help="module name of the final nn.Linear (default: the last one with "
                   "num_labels outputs)")
    p.add_argument("--checkpoints", nargs="+", metavar="CKPT", help="earlier checkpoints of the same model, "
                   "oldest first, for TracIn")
    p.add_argument("--checkpoint-lrs", type=float, nargs="+", metavar="LR",
                   help="learning rate after each checkpoint (default: from their trainer_state.json)")


def import_config(a):
    """ImportConfig from parsed arguments."""
    from .pipeline import ImportConfig
    for k in ("limit_train", "limit_eval", "max_length"):
        v = getattr(a, k)
        if v is not None and v <= 0:
            raise InstattrError(f"--{k.replace('_', '-')} must be positive, got {v}")
    return ImportConfig(model=a.model, data=a.data, damping=a.damping, data_root=a.data_root, max_length=a.max_length,
                        limit_train=a.limit_train, limit_eval=a.limit_eval, sbert=a.sbert, final_layer=a.final_layer,
                        checkpoints=tuple(a.checkpoints or ()),
                        checkpoint_lrs=tuple(a.checkpoint_lrs) if a.checkpoint_lrs else None,
                        text_field=a.text_field, query_field=a.query_field, label_field=a.label_field, seed=a.seed,
                        device=a.device)


def method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("options of the methods beyond the last layer (if-top, gd-top, gc-top, rif-top, "
                             "tracin-top); the paper's eleven take none")
    g.add_argument("--layers", type=int, metavar="K", help="track the linear modules of the top K transformer "
                   "blocks and the head (default 3; a PEFT adapter: its trainable modules)")
    g.add_argument("--modules", metavar="GLOB[,GLOB]", help="track the linear modules (nn.Linear, Conv1D) whose "
                   "names match these glob patterns instead, e.g. '*.layer.5.*,classifier'")
    g.add_argument("--measurement", choices=["loss", "margin"], help="what the test side's gradient measures: the "
                   "loss at the predicted label (default) or the margin of the predicted class")
    g.add_argument("--proj-dim", type=int, metavar="K", help="projection size: K*K numbers per linear layer "
                   "(default 32; 0 = exact gradients, tiny models only)")
    g.add_argument("--projection", choices=["khatri-rao", "orthogonal", "gaussian"],
                   help="how each layer's gradient is sketched: khatri-rao rank-one sketches (default; orthogonal "
                        "for if and rif with --ihvp ekfac), or LoGra's Kronecker product of orthogonal or gaussian "
                        "side projections")
    g.add_argument("--damping", type=float, help="damping added to the Hessian: if, rif (default 0, the run's own "
                   "L2 alone), if-top, rif-top (default 0.1)")
    g.add_argument("--ihvp", choices=["projected", "lissa", "explicit", "ekfac"],
                   help="inverse-Hessian-vector products: projected Gauss-Newton (default), LiSSA as the "
                        "paper ran it, the explicit Hessian (tiny models), or on a language-model run EK-FAC per "
                        "tracked module (with --projection orthogonal or gaussian)")
    g.add_argument("--fisher", choices=["true", "empirical"], help="if and rif on a language-model run: H's "
                   "factors are gradients at tokens drawn from the model (true, default: the Gauss-Newton) or at "
                   "the observed tokens (empirical: one backward pass per batch, and the factors are the "
                   "windows' own gradients)")
    g.add_argument("--whiten-components", type=int, metavar="K", help="trackstar on a language-model run: "
                   "TrackStar's mixing of the queries' gradient autocorrelation into the training rows', set where "
                   "their sorted eigenvalues cross at component K (default 1000; 0: no whitening)")
    g.add_argument("--checkpoints", nargs="+", metavar="CKPT", help="tracin, tracin-top on a Hugging Face model: "
                   "its training checkpoints (save_pretrained folders), oldest first")
    g.add_argument("--checkpoint-lrs", type=float, nargs="+", metavar="LR",
                   help="learning rate after each of --checkpoints (default: their trainer_state.json)")


def method_options(a) -> dict:
    """The method options given on the command line (only those given)."""
    opts = {k: getattr(a, k) for k in ("layers", "projection", "damping", "ihvp", "measurement", "checkpoints",
                                       "checkpoint_lrs", "whiten_components", "fisher") if getattr(a, k) is not None}
    if a.modules is not None:
        opts["modules"] = [m.strip() for m in a.modules.split(",") if m.strip()]
    if a.proj_dim is not None:
        opts["proj_dim"] = a.proj_dim or None   # 0: unprojected
    return opts
