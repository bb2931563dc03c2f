"""An index of training sides: shards on disk, exact and approximate (FAISS) top-k, Ray builds.

>>> from instattr.index import build_run_index, Index
>>> build_run_index(run, ["gd", "if", "nn-cos"], "idx", dtype="float16", ann="ivf")
>>> Index("idx").search(["gd"], run.features("test"), k=10)["gd"]["top"]   # (rows, scores)
"""
from .build import build_index, build_run_index
from .layout import IndexStoreError, verify
from .search import Index

__all__ = ["Index", "IndexStoreError", "build_index", "build_run_index", "verify"]
