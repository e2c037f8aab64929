"""Reports a person can read: what a run, a search or several categories found, as Markdown plus a
self-contained HTML page.

Figures (:mod:`promptopt.plots`) are PNG files beside the report: Markdown links
them, the HTML version embeds them as base64, so it opens anywhere without the
toolkit. Nothing here computes a score: callers pass ``result.json`` documents.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from markdown_it import MarkdownIt

from .artifacts import atomic_write_json, atomic_write_text
from .memory import format_bytes


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _md_to_html(md: str, base: Path) -> str:
    """The report as one HTML page (CommonMark with tables, rendered by markdown-it-py), its figures — PNG files
    in ``base`` — embedded as base64 so the page opens anywhere on its own."""
    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        src = base / str(tokens[idx].attrGet("src"))
        if src.is_file():
            tokens[idx].attrSet("src", "data:image/png;base64," + base64.b64encode(src.read_bytes()).decode())
            tokens[idx].attrSet("style", "max-width:100%")
        return self.image(tokens, idx, options, env)

    renderer.add_render_rule("image", image)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>promptopt report</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:0.9em}th,td{border:1px solid #999;padding:4px}"
            "code,pre{background:#f4f4f4}</style></head><body>\n"
            f"{renderer.render(md)}</body></html>\n")


def figures_and_command(figs: Sequence[tuple[str, str]], command: str | None) -> list[str]:
    """Markdown lines ending a run report: one section per (caption, image file), then the command that made it."""
    md: list[str] = []
    for caption, fname in figs:
        md += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    if command:
        md += ["## Command", "", "```", command, "```", ""]
    return md


def write_report(run_dir: str | Path, markdown: str, name: str = "report") -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` (images embedded) atomically."""
    run_dir = Path(run_dir)
    md_path = atomic_write_text(run_dir / f"{name}.md", markdown)
    html_path = atomic_write_text(run_dir / f"{name}.html", _md_to_html(markdown, run_dir))
    return md_path, html_path


def metric_definition(num_classes: int) -> str:
    """What "mIoU" means in a report: foreground IoU for binary tasks (the few-shot convention)."""
    if num_classes == 2:
        return ("binary task: mIoU is the foreground IoU (the few-shot segmentation convention); "
                "FB-IoU (mean of foreground and background IoU) is reported beside it")
    return f"{num_classes} classes: mIoU is the mean IoU over classes (background included)"


def selection_line(selection: Mapping[str, Any]) -> str:
    """The report's sentence on the oracle mode and the acceptance rule."""
    what = {"holdout": "holdout — every prompt set scored on the validation split",
            "cv": "cross-validated — every prompt set scored on all labelled pool and validation images except "
                  "its own prompts, compared with another set on the images both were scored on"}[selection["oracle"]]
    line = f"Selection oracle: {what}"
    rule = selection.get("rule")
    if rule == "none":
        line += "; acceptance rule: none (any positive gain is kept)"
    elif rule == "se":
        line += (f"; acceptance rule: se — a step counts only if its paired gain exceeds {selection['noise_z']:g} "
                 "standard error(s) of the per-image IoU differences")
    elif rule == "bootstrap":
        line += (f"; acceptance rule: bootstrap — a step counts only if the lower end of a seeded one-sided paired "
                 f"bootstrap interval (z = {selection['noise_z']:g}) of its gain is above zero")
    return line


def reported(entry: Mapping[str, Any], split: str) -> float | None:
    """A strategy's mIoU on ``split`` as reports show it: the mean over its seeds when it has seeds."""
    return entry.get("extra", {}).get(split, {}).get("mean", entry[f"{split}_miou"])


def strategy_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Report rows: this run, then its baselines (a strategy with seeds shows the mean ± std over them)."""
    return [{"name": name, "val_miou": reported(e, "val"), "test_miou": reported(e, "test"),
             "test_std": e.get("extra", {}).get("test", {}).get("std"), "k": len(e["selected"])}
            for name, e in [(result["strategy"] + " (this run)", result), *result["baselines"].items()]]


def write_run_report(folder: Path, title: str, facts: Sequence[str], sections: Sequence[Sequence[str]],
                     figs: Sequence[tuple[str, str]], command: str | None) -> Path:
    """report.md / report.html: a title, a list of facts, sections (a heading, then Markdown blocks), the figures
    (already written beside the report) and the command that made the run."""
    md = [f"# {title}", "", *(f"- {fact}" for fact in facts), ""]
    for heading, *blocks in sections:
        md += [f"## {heading}", ""] + [line for block in blocks for line in (block, "")]
    write_report(folder, "\n".join(md + figures_and_command(figs, command)))
    return folder / "report.md"


def write_strategy_report(folder: Path, result: Mapping[str, Any], figs: Sequence[tuple[str, str]],
                          cost: Mapping[str, Any]) -> Path:
    """The report of a strategy run: data, split, backend, what was selected and how, the strategies compared,
    the worst test images."""
    split, mem, s = result["split"], result["memory"], result["summary"]
    facts = [
        f"Data: `{result['data_root']}`, category `{result['category']}`, {result['num_classes']} classes",
        f"Split (seed {result['split_seed']}): pool {len(split['pool'])}, val {len(split['val'])}, "
        f"test {len(split['test'])}",
        f"Backend: `{result['backend']}` {result['backend_config'].get('checkpoint') or ''}",
        f"Options: {', '.join(f'{k}={v}' for k, v in sorted(result['options'].items())) or 'defaults'}",
        f"Selected ({len(result['selected'])}): {', '.join(result['selected']) or '(learned context)'}",
        f"{'Cross-validated' if (result.get('selection') or {}).get('oracle') == 'cv' else 'Val'} mIoU "
        f"(optimised): **{fmt(result['val_miou'])}**; test mIoU (held out — trust this one): "
        f"**{fmt(result['test_miou'])}** (FB-IoU {fmt(result.get('test_fb_iou'))})",
        f"Metric: {result['metric']}",
        selection_line(result.get("selection") or {"oracle": "holdout"}),
        f"Oracle: {result['evaluations']} prompt-set evaluations by the strategy; this session "
        f"{cost['oracle']['val']['forwards']} model forwards on val; wall time {cost['wall_s_session']:.1f} s",
        f"Memory: the strategy compared an estimated peak of {format_bytes(mem['estimated_peak_bytes'])} "
        f"({mem['estimate_kind']}) with the budget {format_bytes(mem['budget_bytes'])}",
    ]
    if s.get("stop_reason"):
        why = {"pool_exhausted": "the prompt pool has fewer examples than allowed"}.get(s["stop_reason"])
        facts.append(f"Stopped because: {why or s['stop_reason']}")
    if result["extra"]["val"]:
        facts.append("Also scored: " + "; ".join(f"{k} val {fmt(v)} / test {fmt(result['extra']['test'].get(k))}"
                                                 for k, v in result["extra"]["val"].items()))
    sections = [["Strategies compared", markdown_table(
        ["strategy", "prompts", "val mIoU", "test mIoU", "test std"],
        [[r["name"], r["k"], r["val_miou"], r["test_miou"], r["test_std"]] for r in strategy_rows(result)])]]
    per = result.get("test_per_image_iou") or {}
    if per:
        worst = sorted(per.items(), key=lambda kv: kv[1] if kv[1] is not None else -1.0)[:5]
        sections.append(["Worst test images", markdown_table(["image", "IoU"], worst),
                         "Every image's IoU is in `per_image.csv`."])
    return write_run_report(folder, f"promptopt report — {result['category']} ({result['strategy']})", facts,
                            sections, figs, result.get("command"))


def write_search_report(out: Path, result: Mapping[str, Any], cost: Mapping[str, Any],
                        figs: Sequence[tuple[str, str]]) -> Path:
    """The report of a search: the study, the best configuration, the top, failed, lost and surplus trials."""
    numbers, tr = cost["trial_numbers"], result["trials"]

    def knobs(params: Mapping[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "strategy")

    facts = [
        f"Study `{result['study_name']}` in `{result['storage']}` (sampler {result['sampler']}): {tr['total']} trials "
        f"({', '.join(f'{k} {v}' for k, v in tr.items() if k != 'total')})",
        f"Backend `{result['backend']}`; strategies searched: {', '.join(result['strategies'])}",
        f"Best trial {result['best_trial']} (study trial #{cost['best_trial_number']}): val mIoU (optimised) "
        f"**{fmt(result['val_miou'])}**, test mIoU (held out, scored once) **{fmt(result['test_miou'])}** "
        f"(FB-IoU {fmt(result['test_fb_iou'])})",
        f"Metric: {result['metric']}",
        f"Best prompt: `best/prompt.json` ({', '.join(result['selected']) or 'learned context'})",
    ]
    sections = [
        ["Best configuration", markdown_table(["parameter", "value"], sorted(result["best_params"].items()))],
        ["Top trials", markdown_table(["trial", "study #", "val mIoU", "strategy", "parameters"],
                                      [[t["trial"], numbers[str(t["trial"])], t["value"], t["params"].get("strategy"),
                                        knobs(t["params"])] for t in result["top_trials"]])],
    ]
    if result["failed_trials"]:
        sections.append(["Failed trials", "They raised an error; the search went on without them.", markdown_table(
            ["trial", "study #", "strategy", "parameters", "error"],
            [[t["trial"], numbers[str(t["trial"])], t["params"].get("strategy"), knobs(t["params"]), t["error"]]
             for t in result["failed_trials"]])])
    if cost["void_trials"]:
        sections.append(["Lost and surplus trials", "Trials that stand for no result: a worker died or was "
                         "interrupted (its parameters were run again), or the study already had its trials.",
                         markdown_table(["study #", "why"], [[v["number"], v["why"]] for v in cost["void_trials"]])])
    return write_run_report(out, f"promptopt search — {result['category']}", facts, sections, figs,
                            result.get("command"))


def one_line(result: Mapping[str, Any]) -> str:
    """A result in one line (what the CLI prints per category)."""
    what = result.get("strategy")
    if result.get("kind") == "search":
        what = f"best trial {result['best_trial']} of {result['trials']['total']} ({what})"
    line = (f"{result['category']}: {what} val mIoU {fmt(result['val_miou'], 4)}  "
            f"test mIoU {fmt(result.get('test_miou'), 4)}")
    if result.get("selected") is not None:
        shown, more = result["selected"][:8], len(result["selected"]) - 8
        line += f"  ({len(result['selected'])} prompt(s): {', '.join(shown)}{f', … {more} more' if more > 0 else ''})"
    stop = (result.get("summary") or {}).get("stop_reason")
    if stop == "pool_exhausted":
        line += "  [stopped: the pool has fewer examples than --max-prompts]"
    return line


def write_summary(out: Path, results: Mapping[str, Mapping[str, Any]]) -> Path:
    """Table over categories (optimised separately): summary.json and summary.md."""
    names = sorted({n for r in results.values() for n in r.get("baselines", {})})
    header = ["category", "prompts", "val mIoU", "test mIoU"] + [f"{n} test" for n in names]
    rows = [[cat, len(r.get("selected") or []), r["val_miou"], r["test_miou"]]
            + [reported(r["baselines"][n], "test") if n in r.get("baselines", {}) else None for n in names]
            for cat, r in results.items()]
    mean = ["**mean**", ""] + [float(np.nanmean([np.nan if r[j] is None else r[j] for r in rows]))
                               for j in range(2, len(header))]
    md = "# promptopt summary\n\n" + markdown_table(header, rows + [mean]) + "\n"
    atomic_write_json(out / "summary.json", {"categories": dict(results)})
    write_report(out, md, name="summary")
    return out / "summary.md"
