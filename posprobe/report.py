"""A saved scan as one self-contained HTML page, for sharing (`posprobe report DIR --out report.html`).

Owns `report_html(scan)` and `write_report(scan, path)`. The page holds the scan's provenance (model, backend,
weights hash, budget, seed, versions, timings, probe configs, skipped probes), the top heads of every head metric,
and its main figures from `posprobe.render`: the atlas of every numeric head metric, every model- or layer-level
curve, and every per-head curve averaged over the heads of each layer. plotly.js is inlined once, so the page opens
offline: it loads nothing from the network (no CDN script, no MathJax, no fonts).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
code, pre { background: #f6f6f6; }
pre { padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.figure { margin: 1em 0 2em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(rows: list[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def top_heads(scan: Any, top: int = 5) -> pd.DataFrame:
    """One row per numeric head metric: the `top` heads (highest first) as `L{layer}H{head}=value`."""
    from posprobe.render.heads import numeric_metrics

    rows = []
    for metric in numeric_metrics(scan):
        ranked = scan.rank(metric, top=top).dropna(subset=[metric])
        rows.append({"metric": metric, "top heads": ", ".join(f"L{r.layer}H{r.head}={float(getattr(r, metric)):.3g}"
                                                              for r in ranked.itertuples())})
    return pd.DataFrame(rows, columns=["metric", "top heads"])


def _figures(scan: Any) -> list[tuple[str, Any]]:
    from posprobe.render import atlas, layer_mean_curve, model_curve
    from posprobe.render.heads import numeric_metrics
    from posprobe.render.model_view import head_level_curve_names, model_curve_names

    figures = [(f"atlas: {metric}", atlas(scan, metric)) for metric in numeric_metrics(scan)]
    figures += [(f"curve: {name}", model_curve(scan, name)) for name in model_curve_names(scan)]
    figures += [(f"curve: {name} (mean over each layer's heads)", layer_mean_curve(scan, name))
                for name in head_level_curve_names(scan)]
    return figures


def report_html(scan: Any, *, top: int = 5) -> str:
    """The whole page as one string (see the module docstring)."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    meta = scan.meta
    budget = meta.get("budget") or {}
    title = f"posprobe scan of {meta.get('model')}"
    provenance = _table([
        ("model", meta.get("model")), ("backend", meta.get("backend")), ("weights hash", meta.get("weights_hash")),
        ("budget", f"{budget.get('name')}: context lengths {budget.get('context_lengths')}, "
                   f"{budget.get('n_texts')} texts per length"),
        ("seed", meta.get("seed")), ("created", meta.get("created")), ("text source", meta.get("text_source")),
        ("heads", f"{scan.info.n_layers} layers x {scan.info.n_heads} heads ({scan.info.n_kv_heads} KV heads)"),
        ("versions", ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())),
        ("timings (s)", ", ".join(f"{k} {v:.1f}" for k, v in (meta.get("timings_s") or {}).items())),
    ])
    skipped = meta.get("skipped") or {}
    parts = [f"<h1>{_e(title)}</h1>", "<h2>Provenance</h2>", provenance]
    if skipped:
        parts += ["<h2>Skipped probes</h2>", _table(list(skipped.items()))]
    parts += [f"<h2>Top {top} heads per metric</h2>", top_heads(scan, top).to_html(index=False, escape=True)]
    parts.append("<h2>Figures</h2>")
    config = {"displaylogo": False, "responsive": True}
    for caption, fig in _figures(scan):
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, include_mathjax=False, config=config)
        parts.append(f'<div class="figure"><h3>{_e(caption)}</h3>{div}</div>')
    details = json.dumps({"probes": meta.get("probes"), "summaries": meta.get("summaries")}, indent=1)
    parts += ["<h2>Probe configs and summaries</h2>", f"<details><summary>JSON</summary><pre>{_e(details)}</pre>"
              "</details>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style>"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(scan: Any, path: str | Path, *, top: int = 5) -> Path:
    """Write `report_html(scan)` to `path` atomically (a temporary sibling renamed into place)."""
    from posprobe._io import check_output_file

    out = Path(path)
    check_output_file(out)
    text = report_html(scan, top=top)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.writing")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


__all__ = ["report_html", "top_heads", "write_report"]
