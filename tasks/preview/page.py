"""The page of ``clipmask preview``: one static HTML document, inline CSS and SVG, every
user-supplied string escaped."""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from tasks.preview.cards import Card
    from tasks.preview.sample import ManifestSample

HISTOGRAM_BINS = 20


def coverage_histogram(values: Iterable[float], bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of ``values`` in ``bins`` equal bins over [0, 1] (1.0 in the last; out of range clipped)."""
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, max(0, int(float(value) * bins)))] += 1
    return counts


def format_percent(fraction: float) -> str:
    """Coverage as the page shows it: ``0.2534`` -> ``"25.3%"``."""
    return f"{fraction * 100:.1f}%"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def histogram_svg(counts: list[int], title: str) -> str:
    """An inline SVG bar chart of ``counts`` over coverage 0..100%, with axes and labels."""
    width, height, left, right, top, bottom = 640, 220, 48, 12, 28, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(counts, default=0) or 1
    bins = len(counts) or 1
    bar_w = plot_w / bins
    parts = [f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
             f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" class="title">{_e(title)}</text>']
    for i, count in enumerate(counts):
        h = plot_h * count / peak
        x = left + i * bar_w
        lo, hi = 100 * i / bins, 100 * (i + 1) / bins
        parts.append(f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}">'
                     f'<title>{lo:.0f}-{hi:.0f}%: {count} image{"s" if count != 1 else ""}</title></rect>')
    axis_y = top + plot_h
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" class="axis"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}" class="axis"/>')
    for pct in (0, 25, 50, 75, 100):
        x = left + plot_w * pct / 100
        parts.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" class="axis"/>'
                     f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{pct}%</text>')
    for value in sorted({0, peak if max(counts, default=0) else 0}):
        y = axis_y - plot_h * value / peak
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{value}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">'
                 'mask coverage (fraction of pixels on)</text>')
    parts.append(f'<text transform="translate(14 {top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle">'
                 'images</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2327;background:#f6f7f9}
h1{font-size:22px;margin:0 0 12px} h2{font-size:17px;margin:28px 0 8px}
table.facts td{padding:2px 12px 2px 0;vertical-align:top} table.facts td:first-child{color:#646970}
.counts span{display:inline-block;padding:3px 10px;margin:8px 6px 0 0;border-radius:12px;background:#e2e4e7}
.counts .ok{background:#d4f4dd} .counts .bad{background:#fbd5d5} .counts .skip{background:#fff1c2}
.note{color:#646970} code{background:#eceef1;padding:0 3px;border-radius:3px;word-break:break-all}
svg.histogram{background:#fff;border:1px solid #dcdcde;border-radius:6px}
svg.histogram rect{fill:#3b82c4} svg.histogram .axis{stroke:#50575e;stroke-width:1}
svg.histogram text{font-size:11px;fill:#50575e} svg.histogram .title{font-size:13px;fill:#1d2327}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:14px}
.card{background:#fff;border:1px solid #dcdcde;border-radius:6px;padding:10px}
.card.error{border-color:#d63638;background:#fff5f5}
.pair{display:flex;gap:8px;align-items:flex-start} .pair img{max-width:256px;height:auto;display:block;background:#eee}
.name{font-weight:600;word-break:break-all;margin-top:6px} .cov{float:right;font-variant-numeric:tabular-nums}
.err{color:#b32d2e;word-break:break-word}
table.failures{border-collapse:collapse;background:#fff;width:100%}
table.failures th,table.failures td{border:1px solid #dcdcde;padding:4px 8px;text-align:left;vertical-align:top}
table.failures td{word-break:break-all}
"""


def _prompt_text(prompts: list[str], negatives: list[str]) -> str:
    text = " | ".join(prompts) if prompts else "(none)"
    return text + (f" \u2212 {' | '.join(negatives)}" if negatives else "")


def _card_html(card: Card) -> str:
    parts = [f'<div class="card{" error" if card.error else ""}" id="card-{card.number}">']
    if card.thumb and card.overlay and card.size:
        w, h = card.size
        parts.append(f'<div class="pair"><img src="{_e(card.thumb)}" width="{w}" height="{h}" '
                     f'alt="image {_e(card.name)}" loading="lazy"><img src="{_e(card.overlay)}" width="{w}" '
                     f'height="{h}" alt="mask over {_e(card.name)}" loading="lazy"></div>')
    coverage = format_percent(card.coverage) if card.coverage is not None else "n/a"
    parts.append(f'<div class="name"><span class="cov" title="mask coverage">{_e(coverage)}</span>'
                 f'{_e(card.name)}</div>')
    if card.prompts or card.negative_prompts:
        parts.append(f'<div class="note">prompts: {_e(_prompt_text(card.prompts, card.negative_prompts))}</div>')
    if card.note:
        parts.append(f'<div class="note">{_e(card.note)}</div>')
    if card.error:
        parts.append(f'<div class="err">preview error: {_e(card.error)}</div>'
                     f'<div class="note"><code>{_e(card.source)}</code></div>')
    parts.append("</div>")
    return "".join(parts)


def render_page(job_id: str, summary: dict, sample: ManifestSample, cards: list[Card], seed: int) -> str:
    """The whole ``index.html`` (every user-supplied string escaped)."""
    spec = summary.get("spec") or {}
    counts = {name: summary.get(name, sample.counts.get(name, 0)) for name in ("succeeded", "failed", "skipped")}
    total = summary.get("total", sum(v for v in counts.values() if isinstance(v, int)))
    shown = [("job", job_id), ("state", summary.get("state", "?")), ("source", summary.get("source", "?")),
             ("dest", summary.get("dest", "?")),
             ("prompts", " | ".join(map(str, spec.get("prompts") or [])) or "(none)"),
             ("negatives", " | ".join(map(str, spec.get("negative_prompts") or [])) or "(none)"),
             ("threshold", spec.get("threshold", "?")), ("profile", spec.get("profile", "?"))]
    others = {k: v for k, v in spec.items() if k not in ("prompts", "negative_prompts", "threshold", "profile")}
    if others:
        shown.append(("options", ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(others.items()))))
    shown.append(("model", "; ".join(sorted({card.model for card in cards if card.model})) or "(not in the sample)"))
    shown += [("created", summary.get("created_at", "?")), ("finished", summary.get("finished_at", "?"))]
    coverages = [card.coverage for card in cards if card.coverage is not None]
    n = len(coverages)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>clipmask preview: job {_e(job_id)}</title><style>{_CSS}</style></head><body>",
           f"<h1>clipmask preview: job <code>{_e(job_id)}</code></h1>", '<table class="facts">']
    out += [f"<tr><td>{_e(label)}</td><td>{_e(value)}</td></tr>" for label, value in shown]
    out.append("</table>")
    out.append(f'<div class="counts"><span class="ok">{_e(counts["succeeded"])} succeeded</span>'
               f'<span class="bad">{_e(counts["failed"])} failed</span>'
               f'<span class="skip">{_e(counts["skipped"])} skipped</span><span>{_e(total)} total</span></div>')
    if sample.bad_lines:
        out.append(f'<p class="err">{sample.bad_lines} manifest line(s) could not be read.</p>')
    out.append("<h2>Coverage</h2>")
    out.append(histogram_svg(coverage_histogram(coverages), f"coverage of {n} sampled images"))
    out.append(f'<p class="note">Coverage of {n} sampled image{"s" if n != 1 else ""} (the cards below), '
               "not of the whole job: reading every image's metadata of a large job is too slow.</p>")
    errors = sum(1 for card in cards if card.error)
    out.append(f"<h2>Sample: {len(cards)} of {sample.counts['succeeded']} succeeded images</h2>")
    out.append(f'<p class="note">A uniform random sample (seed {seed}), in manifest order. Left: the image; '
               "right: the thresholded mask in red with its outline."
               + (f' <span class="err">{errors} could not be previewed.</span>' if errors else "") + "</p>")
    out.append('<div class="grid">' + "".join(_card_html(card) for card in cards) + "</div>")
    failed_total = sample.counts["failed"]
    out.append(f"<h2>Failures ({len(sample.failed)} of {failed_total} shown)</h2>" if failed_total > len(sample.failed)
               else f"<h2>Failures ({failed_total})</h2>")
    if sample.failed:
        out.append('<table class="failures"><tr><th>source</th><th>error</th></tr>')
        out += [f"<tr><td>{_e(row.get('source', '?'))}</td><td>{_e(row.get('error', ''))}</td></tr>"
                for row in sample.failed]
        out.append("</table>")
    else:
        out.append('<p class="note">No failed images.</p>')
    out.append("</body></html>\n")
    return "\n".join(out)
