"""report.html: one self-contained page (images inline) over everything a run holds."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from ..errors import InstattrError
from ..store import Run, write_text
from .markdown import markdown_to_html

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d2330;line-height:1.5}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #e3e7ef;padding-bottom:.2em;margin-top:2em}
.sub{color:#5b6475}.card{display:inline-block;background:#f4f6fa;border-radius:8px;padding:.6em 1em;
margin:.3em .5em .3em 0}.card b{font-size:1.3em;display:block}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}th,td{border:1px solid #d9dde6;
padding:.3em .6em;text-align:right}th{background:#f4f6fa}td:first-child,th:first-child{text-align:left}
img{max-width:100%;margin:.5em 0;border:1px solid #eee}code{background:#f4f6fa;padding:0 .2em}
.ex{border:1px solid #d9dde6;border-radius:8px;padding:.8em 1em;margin:1em 0}
.ex table{width:100%}.ex td{text-align:left;vertical-align:top}.pos{color:#1a7f37}.neg{color:#b42318}
.muted{color:#8a93a5}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _figures(run: Run, name: str) -> List[Path]:
    folder = run.path / "figures"
    if not folder.is_dir():
        return []
    key = name.replace("-", "_")
    return sorted(p for p in folder.glob("*.png") if p.stem.startswith(name) or p.stem.startswith(key))


def model_description(run: Run) -> str:
    """One sentence on what the run's model is (plain text)."""
    m = run.manifest
    pairs = f", {m.pair_mode} pairs" if m.pair_mode else ""
    if m.mode == "head":
        h = m.head
        return (f"Dataset {m.data.name}; frozen encoder {m.encoder.name} ({m.encoder.pooling} pooling{pairs}) with "
                f"instattr's head: λ = {h.l2}, lr = {h.lr}, {h.epochs} epochs, batch {h.batch_size}, seed {m.seed}.")
    origin = "fine-tuned by instattr from " + m.encoder.name if m.mode == "finetune" else "imported from " + m.hf.path
    adapter = f" (a PEFT adapter on {m.hf.adapter_base})" if m.hf.adapter_base else ""
    return (f"Dataset {m.data.name}; a Hugging Face {m.hf.family} sequence classifier {origin}{adapter}{pairs}; final "
            f"layer {m.hf.final_layer}, λ = {m.l2}"
            + (" (damping standing in for its L2)" if m.mode == "import" else "")
            + f"; sbert-* use {m.sbert.name}.")


def _overview(run: Run) -> str:
    m, met = run.manifest, run.metrics
    cards = []
    for split in ("dev", "test"):
        if met.get(f"{split}_accuracy") is not None:
            cards.append((f"{split} accuracy", f"{met[f'{split}_accuracy']:.3f}"))
    n = m.data.n
    cards += [("training examples", f"{n.get('train', 0):,}"),
              (f"{m.eval_split} examples", f"{n.get(m.eval_split, 0):,}")]
    cards.append(("build time", f"{met.get('timings', {}).get('total_s', 0):.0f} s"))
    card_html = "".join(f'<div class="card"><b>{html.escape(v)}</b>{html.escape(k)}</div>' for k, v in cards)
    return f"<p class='sub'>{html.escape(model_description(run))}</p>{card_html}"


def _stored_scores(run: Run) -> Tuple[List[Tuple[str, str]], List[str]]:
    """((method, split) of every score matrix stored whole, why each other one is left out)."""
    folder = run.path / "scores"
    whole, skipped = [], []
    for side in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        method, _, split = side.stem.rpartition("-")
        if not method or not side.with_suffix(".npy").exists():
            continue
        problem = run.score_problem(method, split)
        if problem is None:
            whole.append((method, split))
        else:
            skipped.append(f"scores/{side.with_suffix('.npy').name} left out: {problem}")
    return whole, skipped


def _scores_table(run: Run, stored: List[Tuple[str, str]]) -> str:
    rows = []
    for method, split in stored:
        info = run.score_info(method, split)
        rows.append(f"<tr><td>{html.escape(info['method'])}</td><td>{html.escape(info['split'])}</td>"
                    f"<td>{len(info['test_idx']):,} × {len(info['train_idx']):,}</td>"
                    f"<td>{info['seconds']:.3f}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Score matrices</h2><table><tr><th>method</th><th>split</th><th>shape</th><th>seconds</th></tr>"
            + "".join(rows) + "</table>")


def _examples(run: Run, stored: List[Tuple[str, str]], n: int = 3, k: int = 3, seed: int = 0) -> str:
    """A few test examples, the top-k supporting training examples of every method side by side."""
    from ..methods import top_k
    split = run.eval_split
    methods = [m for m, sp in stored if sp == split]
    if not methods:
        return ""
    try:
        test_ex, train_ex = run.examples(split), run.examples("train")
    except InstattrError:  # the dataset moved: the report still renders without texts
        return ""
    fs = run.features(split)
    want = ([str(i) for i in fs.idx], [str(i) for i in run.features("train").idx])

    def aligned(method: str) -> bool:   # scores of a subset (--limit-test/--limit-train) are not the split's rows
        info = run.score_info(method, split)
        return (info["test_idx"], info["train_idx"]) == want

    methods = [m for m in methods if aligned(m)]
    if not methods:
        return ""
    n_rows = len(want[0])
    rows = np.random.default_rng(seed).choice(n_rows, size=min(n, n_rows), replace=False)
    labels = run.label_names
    out = ["<h2>Explained test examples</h2><p class='sub'>The three training examples each method "
           "ranks as most supporting for a few random test predictions (label of the training example in "
           "colour).</p>"]

    def text(e):
        return html.escape(e.document + (f" ‖ {e.query}" if e.query else ""))

    for r in rows:
        e = test_ex[int(r)]
        out.append(f"<div class='ex'><b>{text(e)}</b><br><span class='sub'>gold {html.escape(labels[e.label])}, "
                   f"predicted {html.escape(labels[int(fs.pred[r])])} ({float(fs.probs[r].max()):.2f})</span><table>")
        for mname in methods:
            idx, vals = top_k(np.asarray(run.scores(mname, split)[r:r + 1]), k)
            cells = []
            for i in idx[0]:
                t = train_ex[int(i)]
                cls = "pos" if t.label == int(fs.pred[r]) else "neg"
                cells.append(f"<span class='{cls}'>[{html.escape(labels[t.label])}]</span> {text(t)}")
            out.append(f"<tr><td><b>{html.escape(mname)}</b></td><td>{'<br>'.join(cells)}</td></tr>")
        out.append("</table></div>")
    return "".join(out)


def build_report(run: Run, path: Optional[Path] = None, log: Optional[Callable[[str], None]] = None) -> Path:
    """Write ``report.html`` (self-contained) from whatever the run holds; returns its path.
    ``log`` hears what the page leaves out and why (damaged scores, no results yet)."""
    with run.writing("report"):
        return _build(run, path, log or (lambda message: None))


def _build(run: Run, path: Optional[Path], log: Callable[[str], None]) -> Path:
    m = run.manifest
    stored, skipped = _stored_scores(run)
    parts = [f"<h1>instattr report: {html.escape(m.data.name)}</h1>", _overview(run)]
    shown = 0
    from ..evaluate import evaluations
    for name, title, intro in ((e.name, e.title, e.intro) for e in evaluations()):
        md = run.path / "results" / f"{name}.md"
        figs = _figures(run, name)
        if not md.exists() and not figs:
            continue
        shown += 1
        parts.append(f"<h2>{html.escape(title)}</h2><p class='sub'>{html.escape(intro)}</p>")
        if md.exists():
            parts.append(markdown_to_html(md.read_text(encoding="utf-8")))
        parts += [_img(f) for f in figs]
    notes = list(skipped)
    if not shown:
        notes.append(f"no evaluation results in {run.path / 'results'} yet: run `instattr evaluate NAME --run "
                     f"{run.path}` or `instattr reproduce`")
    if not stored:
        notes.append(f"no stored scores: run `instattr attribute --run {run.path}`")
    if notes:
        parts.append("<h2>Not shown</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    for note in notes:
        log(note)
    parts.append(_examples(run, stored))
    parts.append(_scores_table(run, stored))
    parts.append(f"<p class='muted'>instattr {html.escape(m.versions.get('instattr', '?'))} · torch "
                 f"{html.escape(m.versions.get('torch', '?'))} · run directory "
                 f"<code>{html.escape(str(run.path))}</code></p>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>instattr: {html.escape(m.data.name)}"
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    return write_text(path or run.path / "report.html", page)
