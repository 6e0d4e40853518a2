"""report.html for `artaug eval`, and the generic pieces (page, SVG plot, metric table,
verdict) that the run report of `artaug run` (recipe/report.py) is made of: self-contained
pages a person opens in a browser to see at a glance whether the run helped.

Images sit beside the page (relative paths inside the eval or run folder); plots are inline
SVG drawn with matplotlib's Agg backend; there is no JavaScript at all, so the page works
offline and from a file:// URL.
"""

from __future__ import annotations

import html
import io
import os

import numpy as np

from ..files import atomic_write_bytes
from .scoring import SELECTION_LABEL

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:13px}
th{background:#f3f3f3} td.l,th.l{text-align:left}
.good{color:#0a7a2f;font-weight:600} .bad{color:#b3261e;font-weight:600} .muted{color:#777}
.grid{display:flex;flex-wrap:wrap;gap:12px} .cell{border:1px solid #ddd;padding:6px;width:min(560px,100%)}
.cell img{width:100%;height:auto;display:block;image-rendering:pixelated}
.pair{display:flex;gap:4px} .pair figure{margin:0;flex:1} figcaption{font-size:11px;color:#555}
.verdict{font-size:15px;padding:8px 12px;background:#f6f6f6;border-left:4px solid #888;margin:12px 0}
.kept{border-left-color:#0a7a2f} .rejected{border-left-color:#b3261e}
.plots{display:flex;flex-wrap:wrap;gap:16px} .plots svg{max-width:480px;height:auto}
"""


def esc(x) -> str:
    return html.escape(str(x))


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{esc(title)}</h1>\n{body}\n</body></html>\n")


def svg_plot(draw, width: float = 4.8, height: float = 3.0) -> str:
    """An inline SVG of a matplotlib figure drawn by `draw(ax)` (Agg backend, no window)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    finally:
        plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _fmt(v, kind="score") -> str:
    if v is None:
        return ""
    return f"{v:.2%}" if kind == "preference" else f"{v:.4f}"


def metric_table(result: dict) -> str:
    """The paper-like table: per candidate and metric, the means, the paired difference and
    the win rate, each with its 95% interval; a verdict colour where the interval excludes a tie."""
    rows = []
    base = result["arms"][0]["name"]
    for arm, metrics in result["comparisons"].items():
        rows.append(f"<h3>{esc(arm)} vs {esc(base)}</h3><table><tr><th class=l>metric</th><th>{esc(base)}</th>"
                    f"<th>{esc(arm)}</th><th>difference [95% CI]</th><th>win rate [95% CI]</th>"
                    "<th>preference [95% CI]</th><th>pairs</th></tr>")
        for name, r in metrics.items():
            if "skipped" in r:
                rows.append(f"<tr><td class=l>{esc(name)}</td><td class='l muted' colspan=6>{esc(r['skipped'])}</td></tr>")
                continue
            lo, hi = r["win_ci"]
            tone = "good" if lo > 0.5 else ("bad" if hi < 0.5 else "")
            pref = ""
            if r["kind"] == "preference":
                plo, phi = r["preference_ci"]
                pref = f"{r['preference']:.2%} [{plo:.2%}, {phi:.2%}]"
                mean_b, mean_a = f"{1 - r['preference']:.2%}", f"{r['preference']:.2%}"
            else:
                mean_b, mean_a = _fmt(r["mean_b"]), _fmt(r["mean_a"])
            dlo, dhi = r["diff_ci"]
            note = " (lower is better)" if r.get("better") == "lower" else ""
            note = (" (alignment)" if r["kind"] == "alignment" else "") + note
            note += f" ({SELECTION_LABEL})" if r.get("selection") else ""
            rows.append(f"<tr><td class=l>{esc(name)}{note}</td>"
                        f"<td>{mean_b}</td><td>{mean_a}</td><td>{r['mean_diff']:+.4f} [{dlo:+.4f}, {dhi:+.4f}]</td>"
                        f"<td class='{tone}'>{r['win_rate']:.1%} [{lo:.1%}, {hi:.1%}]</td><td>{pref}</td>"
                        f"<td>{r['n']}</td></tr>")
        rows.append("</table>")
        cats = sorted({c for r in metrics.values() for c in r.get("by_category", {})})
        if len(cats) > 1:
            names = [n for n, r in metrics.items() if r.get("by_category")]
            rows.append("<table><tr><th class=l>category</th>" + "".join(f"<th>{esc(n)} win rate</th>" for n in names)
                        + "<th>pairs</th></tr>")
            for c in cats:
                cells = "".join(f"<td>{metrics[n]['by_category'].get(c, {}).get('win_rate', float('nan')):.1%}</td>"
                                for n in names)
                n_pairs = metrics[names[0]]["by_category"].get(c, {}).get("n", 0)
                rows.append(f"<tr><td class=l>{esc(c or '-')}</td>{cells}<td>{n_pairs}</td></tr>")
            rows.append("</table>")
    return "\n".join(rows)


# Row kinds the verdict reads: quality scores, preferences and the eval's judges (render fidelity).
VERDICT_KINDS = ("quality", "preference", "judge")


def verdict(result: dict) -> str:
    """One sentence: did the candidate beat the baseline on the independent quality metrics and
    judges? A selection score (a row the run's filter scorer computed, marked "selection") is never
    evidence: a LoRA trained on the pairs it preferred is expected to raise it."""
    parts = []
    for arm, metrics in result["comparisons"].items():
        scored = {n: r for n, r in metrics.items() if "skipped" not in r and r["kind"] in VERDICT_KINDS}
        quality = {n: r for n, r in scored.items() if not r.get("selection")}
        wins = [n for n, r in quality.items() if r["win_ci"][0] > 0.5]
        losses = [n for n, r in quality.items() if r["win_ci"][1] < 0.5]
        if not quality and scored:
            parts.append(f"{arm}: no verdict, {', '.join(scored)} only, the run's selection score (not independent); "
                         "score with an independent judge (e.g. heuristic+fidelity on the tiny model)")
        elif wins and not losses:
            parts.append(f"{arm} beats the baseline on {', '.join(wins)} (the 95% interval of the win rate is above 50%)")
        elif losses and not wins:
            parts.append(f"{arm} is worse than the baseline on {', '.join(losses)}")
        else:
            parts.append(f"{arm}: no clear difference on the quality metrics"
                         + (f" (better on {', '.join(wins)}, worse on {', '.join(losses)})" if wins or losses else ""))
    return "; ".join(parts) + "."


def write_eval_report(out_dir: str, cfg, result: dict, scores: dict, max_prompts: int = 24) -> str:
    """report.html of an eval folder; returns its path relative to the folder."""
    from .layout import image_path

    base = cfg.arms[0].name
    body = [f"<div class=verdict>{esc(verdict(result))}</div>",
            f"<p>model <b>{esc(cfg.model)}</b>; {len(cfg.prompts)} prompts x {cfg.seeds} seeds on the same seeds in "
            f"every arm; scorer <code>{esc(cfg.scorer)}</code>. Win rates count ties as half; intervals: 95% "
            "bootstrap over prompts, seeds nested.</p>",
            "<h2>Metrics</h2>", metric_table(result)]
    plots = []
    for arm in cfg.arms[1:]:
        for metric, r in result["comparisons"][arm.name].items():
            if "skipped" in r:
                continue
            d = scores[arm.name][metric] - scores[base][metric]
            d = d[np.isfinite(d)]

            def draw(ax, d=d, metric=metric, arm=arm.name):
                ax.hist(d, bins=min(30, max(5, len(d) // 3)), color="#4a78b5")
                ax.axvline(0, color="#b3261e", lw=1)
                ax.set_title(f"{metric}: {arm} - {base}, per image pair", fontsize=9)
                ax.set_xlabel("paired difference", fontsize=8)
                ax.tick_params(labelsize=7)

            plots.append(svg_plot(draw))
    body += ["<h2>Paired differences</h2>", "<div class=plots>" + "".join(plots) + "</div>"]
    cells = []
    main_metric = next(iter(result["comparisons"][cfg.arms[1].name]), None)
    for p, item in enumerate(cfg.prompts[:max_prompts]):
        figs = []
        for arm in cfg.arms:
            rel = os.path.relpath(image_path(out_dir, arm.name, p, 0), out_dir)
            value = scores[arm.name].get(main_metric)
            note = f" {main_metric} {value[p * cfg.seeds]:.3f}" if value is not None else ""
            figs.append(f"<figure><img src=\"{esc(rel)}\" alt=\"{esc(arm.name)}\"><figcaption>{esc(arm.name)}"
                        f"{esc(note)}</figcaption></figure>")
        cells.append(f"<div class=cell><div class=pair>{''.join(figs)}</div><figcaption>{esc(item.prompt)} "
                     f"<span class=muted>[{esc(item.category)}], seed {cfg.seed + p * cfg.seeds}</span></figcaption></div>")
    body += [f"<h2>Images (first {min(max_prompts, len(cfg.prompts))} prompts, first seed)</h2>",
             "<div class=grid>" + "".join(cells) + "</div>",
             f"<h2>Numbers</h2><p class=muted>results.json; {result['timing']['scorer_forward_passes']} scorer forward "
             f"passes, {result['timing']['score_cache_hits']} from the cache.</p>"]
    path = os.path.join(out_dir, "report.html")
    atomic_write_bytes(path, page(f"artaug eval: {cfg.model}", "\n".join(body)).encode("utf-8"))
    return "report.html"
