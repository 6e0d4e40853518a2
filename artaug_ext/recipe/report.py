"""report.html of an `artaug run` folder: the rounds, plots, every round's pairs, the final
LoRA and its held-out check, made of the eval report's generic pieces."""

from __future__ import annotations

import json
import os

from ..eval.report import esc, metric_table, page, svg_plot, verdict
from ..eval.scoring import SELECTION_LABEL
from ..files import atomic_write_bytes
from .layout import MODEL_CARD, RoundRecord, round_dir, stage_losses, stage_samples

SAMPLE_WIDTH = 192  # CSS pixels of a sample image in the report (the file keeps its size)


def _round_pictures(out_dir: str, folder: str, max_items: int = 24) -> str:
    """Original vs enhanced of a round's items, the critic's boxes and local prompts drawn on
    them (written once into the round's report/ folder), with each pair's verdict."""
    from ..interact.images import load_image, png_bytes
    from ..interact.manifest import merged_manifest
    from ..interact.parse import Suggestion
    from ..interact.pictures import pair_picture

    records = merged_manifest(os.path.join(folder, "interact"))
    enhanced = [r for r in records if r.get("enhanced")]
    shown = sorted(enhanced, key=lambda r: (not r.get("kept"), r["id"]))[:max_items]
    cells = []
    for rec in shown:
        rel = os.path.join(os.path.relpath(folder, out_dir), "report", f"{rec['id']}.png")
        path = os.path.join(out_dir, rel)
        if not os.path.isfile(path):
            suggestions = [Suggestion.from_dict(s) for s in rec.get("suggestions", [])]
            pic = pair_picture(load_image(os.path.join(folder, "interact", rec["original"])),
                               load_image(os.path.join(folder, "interact", rec["enhanced"])), suggestions, rec["prompt"])
            atomic_write_bytes(path, png_bytes(pic))
        prompts = "; ".join(f"[{s.get('category', '')}] {s.get('prompt', '')}" for s in rec.get("suggestions", []))
        kept = "kept" if rec.get("kept") else "rejected"
        cells.append(f"<div class='cell'><img src=\"{esc(rel)}\" alt=\"{esc(rec['id'])}\">"
                     f"<div class='verdict {kept}'>{kept}: {esc(rec.get('why', ''))}</div>"
                     f"<figcaption>{esc(rec['prompt'])}<br><span class=muted>critic: {esc(prompts)}</span></figcaption></div>")
    without = len(records) - len(enhanced)
    note = f"<p class=muted>{without} of {len(records)} items had no suggestion from the critic.</p>" if without else ""
    return note + "<div class=grid>" + "".join(cells) + "</div>"


def _rounds_table(rounds: list[RoundRecord]) -> list[str]:
    body = ["<h2>Rounds</h2><table><tr><th>round</th><th>items</th><th>usable suggestions</th><th>enhanced</th><th>kept</th>"
            "<th>kept share</th>"
            "<th>mean gain of kept</th><th>mean gain of enhanced</th><th>trained pairs</th><th>stage-1 loss</th>"
            "<th>stage-2 (or DPO) loss</th><th>paired gap of the last stage</th><th>seconds</th></tr>"]
    for rec in rounds:
        def loss(stage, train=rec.train or {}):
            s = train.get(stage)
            return f"{s['first']:.4f} &rarr; {s['last']:.4f}" if s else ""

        def gap(train=rec.train or {}):
            g = next((train[k]["paired_gap"] for k in ("dpo", "stage2") if "paired_gap" in train.get(k, {})), None)
            return f"{g['before']:+.5f} &rarr; {g['after']:+.5f}" if g else ""

        body.append(f"<tr><td>{rec.round}</td><td>{rec.items}</td><td>{rec.usable_suggestions} of {rec.suggestions}</td>"
                    f"<td>{rec.enhanced}</td><td>{rec.kept}</td>"
                    f"<td>{rec.kept_fraction:.1%}</td><td>{rec.mean_gain:.4f}</td><td>{_number(rec.mean_gain_enhanced)}</td>"
                    f"<td>{rec.trained_pairs}</td>"
                    f"<td>{loss('stage1')}</td><td>{loss('stage2') or loss('dpo')}</td><td>{gap()}</td>"
                    f"<td>{rec.seconds}</td></tr>")
    body.append("</table><p>Usable suggestions: those with a local prompt of their own; a suggestion whose "
                "local prompt is the global prompt would blend a prediction with itself and is dropped. "
                "Losses: the mean over the first 10% of a stage's steps &rarr; over its last 10% "
                "(one step's loss under random timesteps is mostly noise). Paired gap: the enhanced images' "
                "flow-matching error minus the originals', under the same fixed noise and timesteps, with the "
                "stage's LoRA off &rarr; on; a LoRA that learned the pairs' difference lowers it.</p>")
    return body


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _plots(out_dir: str, rounds: list[RoundRecord]) -> list[str]:
    xs = [rec.round for rec in rounds]
    plots = [svg_plot(lambda ax: (ax.bar(xs, [rec.kept_fraction for rec in rounds], color="#4a78b5"),
                                  ax.set_title("kept share of items per round", fontsize=9), ax.set_xticks(xs))),
             svg_plot(lambda ax: (ax.bar(xs, [rec.mean_gain for rec in rounds], color="#5a9a5a"),
                                  ax.set_title("mean score gain of kept pairs", fontsize=9), ax.set_xticks(xs)))]
    for rec in rounds:
        losses = stage_losses(out_dir, rec.round)
        if losses:
            def draw(ax, losses=losses, n=rec.round):
                for name, values in sorted(losses.items())[:8]:
                    ax.plot(range(1, len(values) + 1), values, label=name, lw=1)
                ax.set_title(f"round {n}: training loss per step", fontsize=9)
                ax.set_xlabel("step", fontsize=8)
                ax.legend(fontsize=7)

            plots.append(svg_plot(draw))
    return ["<h2>Plots</h2>", "<div class=plots>" + "".join(plots) + "</div>"]


def _stage_samples_table(samples: list[dict]) -> str:
    """One stage's sample images: a row per step, a column per sample prompt (with its seed)."""
    steps: dict[int, list[dict]] = {}
    for r in samples:
        steps.setdefault(r["step"], []).append(r)
    first = next(iter(steps.values()))
    head = "".join(f"<th class=l style=\"width:{SAMPLE_WIDTH}px;font-weight:normal\">{esc(r['prompt'])} "
                   f"<span class=muted>(seed {r['seed']})</span></th>" for r in first)
    rows = []
    for step, made in steps.items():
        cells = "".join(f"<td class=l><img src=\"{esc(r['path'])}\" alt=\"step {step}: {esc(r['prompt'])}\" "
                        f"style=\"width:{SAMPLE_WIDTH}px;height:auto;display:block;image-rendering:pixelated\"></td>"
                        for r in made)
        rows.append(f"<tr><td>{step}</td>{cells}</tr>")
    return f"<table><tr><th>step</th>{head}</tr>{''.join(rows)}</table>"


def _samples_sections(out_dir: str, rounds: list[RoundRecord]) -> list[str]:
    """Per round and stage, the images its LoRA in training drew for the fixed sample prompts
    and seed ([train] sample_every), by step; nothing when the run made none."""
    body = []
    for rec in rounds:
        stages = {stage: samples for stage, samples in stage_samples(out_dir, rec.round).items() if samples}
        for stage, samples in stages.items():
            body += [f"<h2>Round {rec.round}, {esc(stage)}: sample images during training</h2>",
                     _stage_samples_table(samples)]
    if body:
        body.insert(0, "<p>Sample images: what each stage's model (the LoRA in training on top of the running base, "
                       "and LoRA_1 under a differential stage 2) draws for the same prompts from the same seed every "
                       "<code>train.sample_every</code> steps and at the stage's last step, at the run's generation "
                       "settings.</p>")
    return body


def _final_section(final: dict) -> list[str]:
    energy = f", retained energy &ge; {final['energy_min']:.4f}" if final.get("rank") else " (the exact sum)"
    return [f"<h2>Final LoRA</h2><p><a href=\"{esc(final['lora'])}\">{esc(final['lora'])}</a> (kohya format: "
            f"DiffSynth, ComfyUI, diffusers) and <a href=\"{esc(final['lora_diffsynth'])}\">"
            f"{esc(final['lora_diffsynth'])}</a>; {final['rounds']} round(s), rank "
            f"{final['rank'] or final['ranks_before']}{energy}; card: {esc(MODEL_CARD)}</p>"]


def _selection_note(result: dict) -> str:
    """Which rows of the held-out check the run's own filter scorer computed (empty if none)."""
    names = result.get("selection_metrics") or []
    if not names:
        return ""
    return (f"<p><b>{esc(', '.join(names))}: {esc(SELECTION_LABEL)}.</b> The run's filter scorer "
            f"({esc(result.get('selection_scorer'))}) chose the pairs trained on by these scores, so the LoRA is "
            "expected to raise them; the verdict above is drawn from the independent scorers only.</p>")


def write_run_report(out_dir: str, summary: dict) -> str:
    """report.html of a run folder (`summary` as the runner returns it); returns its relative path."""
    rounds = [RoundRecord.from_dict(d) for d in summary["rounds"]]
    final = summary.get("final")
    check = summary.get("eval")
    said = verdict(check["result"]) if check else ("no held-out check in this recipe" if final else "no LoRA was trained")
    body = [f"<div class=verdict>{esc(said)}</div>", *_rounds_table(rounds)]
    if summary.get("stopped"):
        body.append(f"<p><b>Stopped:</b> {esc(summary['stopped'])}</p>")
    body += _plots(out_dir, rounds)
    if final:
        body += _final_section(final)
    if check:
        body += ["<h2>Held-out check</h2>",
                 f"<p>{esc(check['what'])} <a href=\"{esc(check['report'])}\">Full eval report</a>.</p>",
                 _selection_note(check["result"]), metric_table(check["result"])]
    body += _samples_sections(out_dir, rounds)
    for rec in rounds:
        folder = round_dir(out_dir, rec.round)
        if os.path.isfile(os.path.join(folder, "interact", "manifest.jsonl")):
            body += [f"<h2>Round {rec.round}: original vs enhanced</h2>", _round_pictures(out_dir, folder)]
    body.append(f"<h2>Numbers</h2><pre>{esc(json.dumps(summary['rounds'], indent=1)[:20000])}</pre>")
    path = os.path.join(out_dir, "report.html")
    atomic_write_bytes(path, page(f"artaug run: {os.path.basename(out_dir)}", "\n".join(body)).encode("utf-8"))
    return "report.html"
