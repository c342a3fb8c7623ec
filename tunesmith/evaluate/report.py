"""Before/after evaluation report (JSON + Markdown) and the training-curve plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.evaluate.plots import pyplot, save_figure

_HEADLINE = ["accuracy", "f1_macro", "precision_macro", "recall_macro", "ece", "loss", "perplexity", "token_accuracy",
             "exact_match", "contains", "rouge_l", "chrf", "margin", "reward", "positive_share", "kl", "completion_tokens",
             "tax_perplexity", "mae", "rmse", "pearson", "spearman", "forgetting_perplexity", "general_qa_accuracy"]
# Metrics where a fall is the improvement (the rest: a rise; completion_tokens: neither).
LOWER_IS_BETTER = frozenset({"ece", "loss", "perplexity", "kl", "tax_perplexity", "mae", "rmse", "forgetting_perplexity"})
NEUTRAL = frozenset({"completion_tokens"})


def _fmt(v: Any, sign: str = "") -> str:
    """4 decimals; 4 significant digits past 1e5 (an untrained model's perplexity)."""
    if not isinstance(v, float):
        return str(v)
    return f"{v:{sign}.4g}" if abs(v) >= 1e5 else f"{v:{sign}.4f}"


def _short(text: str, n: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell(s: dict) -> str:
    if "label" in s:
        return f"{s['label']} ({s['probability']:.2f})"
    if "output" in s:
        return _short(s["output"], 120).replace("|", "\\|")
    return " ".join(f"{v:.3f}" for k, v in s.items() if k != "input")  # a reward, a predicted value


def _ci(ci: list[float] | None) -> str:
    return f" [{_fmt(float(ci[0]))}, {_fmt(float(ci[1]))}]" if ci else ""


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def verdict(metric: str, row: dict) -> str:
    """'improved' / 'worse' / 'changed' when the change is significant, else 'no significant change'."""
    if not row.get("significant"):
        return "no significant change"
    if metric in NEUTRAL:
        return "changed"
    better = (row["change"] < 0) == (metric in LOWER_IS_BETTER)
    return "improved" if better else "worse"


def metric_table(before: dict | None, after: dict, stats: dict | None) -> list[str]:
    """Headline metrics before and after with 95% intervals, the change, its test and verdict."""
    rows = (stats or {}).get("metrics", {})
    lines = ["| metric | before [95% CI] | after [95% CI] | change [95% CI] | test | p | verdict |",
             "|---|---|---|---|---|---|---|"]
    for k in _HEADLINE:
        if k not in after["metrics"]:
            continue
        r = rows.get(k, {})
        b = _fmt(before["metrics"][k]) + _ci(r.get("before_ci")) if before and k in before["metrics"] else "-"
        a = _fmt(after["metrics"][k]) + _ci(r.get("after_ci"))
        if "p" in r:
            lines.append(f"| {k} | {b} | {a} | {_fmt(r['change'], '+')}{_ci(r['change_ci'])} | {r['test']} | {_p(r['p'])} "
                         f"| {verdict(k, r)} |")
        else:
            change = _fmt(after['metrics'][k] - before['metrics'][k], "+") \
                if before and isinstance(before["metrics"].get(k), float) else "-"
            lines.append(f"| {k} | {b} | {a} | {change} | - | - | {'no per-example scores' if before else '-'} |")
    return lines


def stats_notes(stats: dict | None, examples: int) -> list[str]:
    """How to read the intervals and tests, and which comparisons are not paired."""
    if not stats or not stats.get("metrics"):
        return []
    tested = any("p" in r for r in stats["metrics"].values())
    notes = [f"Intervals: {stats['level']:.0%} bootstrap percentile intervals over the evaluated examples "
             f"({stats['resamples']} resamples, seeded)."
             + (" Change: after - before, paired on the same examples; McNemar's mid-p test for 0/1 scores, else "
                "the paired bootstrap (p: the smallest level at which the change's interval excludes 0). Verdicts "
                "at the 5% level, metric by metric (no correction for looking at several)." if tested else "")]
    if stats.get("unpaired"):
        notes.append(f"Not paired ({', '.join(stats['unpaired'])}): before and after scored different units; "
                     "their intervals are independent.")
    if examples < 100:
        notes.append(f"Only {examples} examples: intervals are wide and a real change of a few points can "
                     "pass as not significant.")
    return notes


def headline(before: dict | None, stats: dict | None) -> str | None:
    """One sentence on the first headline metric that has a test."""
    rows = (stats or {}).get("metrics", {})
    for k in _HEADLINE:
        r = rows.get(k)
        if before and r and "p" in r:
            word = verdict(k, r)
            return (f"**{k}: {_fmt(r['before'])} -> {_fmt(r['after'])} ({_fmt(r['change'], '+')}, 95% CI "
                    f"{_fmt(r['change_ci'][0], '+')} to {_fmt(r['change_ci'][1], '+')}); {r['test']} p = {_p(r['p'])}: "
                    + ("the gain is real at the 5% level" if word == "improved" else
                       "the model got worse, beyond chance" if word == "worse" else
                       "the change could be chance") + ".**") if r.get("change_ci") else None
    return None


def comparison_markdown(before: dict | None, after: dict, stats: dict | None = None) -> str:
    """The 'untrained vs trained' tables: headline metrics with intervals and tests, then the
    same sample inputs. `stats`: evaluate.stats.compare_results(before, after)."""
    lines = [f"Evaluated on the **{after['split']}** split ({after['examples']} examples).", ""]
    line = headline(before, stats)
    lines += [line, ""] if line else []
    lines += metric_table(before, after, stats)
    if after.get("per_source"):  # a data mix: how each source fares, before and after
        lines += ["", "| source | examples | metric | before | after |", "|---|---|---|---|---|"]
        for name, res in after["per_source"].items():
            b_res = (before or {}).get("per_source", {}).get(name)
            for k in [k for k in _HEADLINE if k in res["metrics"]][:2]:
                b = _fmt(b_res["metrics"][k]) if b_res else "-"
                lines.append(f"| `{name}` | {res['examples']} | {k} | {b} | {_fmt(res['metrics'][k])} |")
    notes = stats_notes(stats, after["examples"])
    lines += [""] + notes if notes else []
    lines += ["", "| input | before | after |", "|---|---|---|"]
    for i, s in enumerate(after["samples"]):
        b = _cell(before["samples"][i]) if before else "-"
        lines.append(f"| {_short(s['input'], 70).replace('|', '/')} | {b} | {_cell(s)} |")
    return "\n".join(lines)


def single_markdown(result: dict, stats: dict | None = None) -> str:
    """One model's evaluation (for `tunesmith eval`): headline metrics with 95% intervals
    (`stats`: evaluate.stats.compare_results(None, result)) and sample outputs."""
    rows = (stats or {}).get("metrics", {})
    lines = [f"Evaluated {result['examples']} examples.", ""]
    lines += [f"> warning: {w}" for w in result.get("warnings", [])] + ([""] if result.get("warnings") else [])
    lines += ["| metric | value [95% CI] |", "|---|---|"]
    lines += [f"| {k} | {_fmt(result['metrics'][k])}{_ci(rows.get(k, {}).get('after_ci'))} |"
              for k in _HEADLINE if k in result["metrics"]]
    lines += ["", "| input | output |", "|---|---|"]
    lines += [f"| {_short(s['input'], 70).replace('|', '/')} | {_cell(s)} |" for s in result["samples"]]
    return "\n".join(lines)


def forgetting_markdown(before: dict | None, after: dict, stats: dict | None, note: str | None = None) -> list[str]:
    """The forgetting probe: general-text perplexity and general questions, before vs after."""
    keys = [k for k in ("forgetting_perplexity", "general_qa_accuracy") if k in after["metrics"]]
    if not keys:
        return []
    rows = (stats or {}).get("metrics", {})
    md = ["", "## Forgetting (general text and general knowledge, before vs after)", ""]
    md += [f"> {note}", ""] if note else []
    for k in keys:
        r = rows.get(k, {})
        what = "perplexity on held-out general text" if k == "forgetting_perplexity" else "general questions answered"
        b = f"{_fmt(before['metrics'][k])}{_ci(r.get('before_ci'))} -> " if before and k in before["metrics"] else ""
        test = f"; change {_fmt(r['change'], '+')}{_ci(r['change_ci'])}, {r['test']} p = {_p(r['p'])}: {verdict(k, r)}" \
            if "p" in r else ""
        md.append(f"- {what}: {b}{_fmt(after['metrics'][k])}{_ci(r.get('after_ci'))}{test}")
    qa = after.get("forgetting") or []
    if qa:
        old = {q["question"]: q for q in (before or {}).get("forgetting") or []}
        md += ["", "| question | accepted | before | after |", "|---|---|---|---|"]
        for q in qa:
            b = old.get(q["question"])
            cell = lambda x: ("✓ " if x["correct"] else "✗ ") + _short(x["output"], 60).replace("|", "/")  # noqa: E731
            md.append(f"| {_short(q['question'], 60)} | {', '.join(q['answers'])} | {cell(b) if b else '-'} | {cell(q)} |")
    return md


def write_report(run_dir: Path, before: dict | None, after: dict, summary: dict, stats: dict | None = None) -> str:
    """Write eval_report.json and eval_report.md; returns the Markdown."""
    (run_dir / "eval_report.json").write_text(json.dumps({"summary": summary, "before": before, "after": after,
                                                          "stats": stats}, indent=2))
    md = [f"# Run report: {run_dir.name}", "",  # the folder's name: output.dir may not contain output.name
          f"- task: {summary['task']}, method: {summary['method']}, base: `{summary['base_model']}`",
          f"- {summary['params']}", f"- precision: {summary['precision']}, device: {summary['device']}",
          f"- steps: {summary['steps']}, train time: {summary['train_seconds']:.0f} s, total: {summary['wall_seconds']:.0f} s",
          f"- best validation {summary['best_metric']}: {_fmt(summary['best_value'])} (step {summary['best_step']})", "",
          "## Before vs after training", "", comparison_markdown(before, after, stats)]
    if (run_dir / "reliability.png").is_file():
        md += ["", "## Calibration", "", f"ECE ({len(after['metrics']['calibration'])} equal-width bins): "
               + (f"before {before['metrics']['ece']:.4f}, " if before and "ece" in before["metrics"] else "")
               + f"after {after['metrics']['ece']:.4f}. A calibrated model's bars meet the diagonal: "
               "of the answers given with confidence 0.8, 80% are right.", "", "![reliability diagram](reliability.png)"]
    if (run_dir / "confusion.png").is_file():
        md += ["", "![confusion matrices](confusion.png)"]
    cm = after["metrics"].get("confusion_matrix")
    if cm:
        names = list(after["metrics"]["per_class"])
        md += ["", "## Confusion matrix (after; rows = true, columns = predicted)", "",
               "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        md += [f"| {names[i]} | " + " | ".join(str(x) for x in row) + " |" for i, row in enumerate(cm)]
    if after.get("generations") and "reward" in after["generations"][0]:
        md += ["", "## Sampled completions on held-out prompts (reward)", "", "| prompt | before | after |", "|---|---|---|"]
        for i, g in enumerate(after["generations"]):
            b = before["generations"][i] if before and len(before.get("generations") or []) > i else None
            cell = lambda x: f"{_short(x['completion'], 80)} ({x['reward']:.2f})".replace("|", "/")  # noqa: E731
            md.append(f"| {_short(g['prompt'], 50).replace('|', '/')} | {cell(b) if b else '-'} | {cell(g)} |")
    gens = after.get("generations") or []
    if gens and "exact" in gens[0]:  # SFT: every held-out question, its reference and both answers
        md += ["", f"## Answers to the held-out prompts ({sum(g['exact'] for g in gens)} exact, "
               f"{sum(g['contains'] for g in gens)} containing the reference, of {len(gens)})", "",
               "| prompt | reference | before | after |", "|---|---|---|---|"]
        for i, g in enumerate(gens[:100]):
            b = before["generations"][i] if before and len(before.get("generations") or []) > i else None
            cell = lambda x: ("✓ " if x["contains"] else "✗ ") + _short(x["output"], 80).replace("|", "/")  # noqa: E731
            md.append(f"| {_short(g.get('prompt') or '', 60).replace('|', '/')} | {_short(g['reference'], 40).replace('|', '/')} "
                      f"| {cell(b) if b else '-'} | {cell(g)} |")
        if len(gens) > 100:
            md.append(f"\n({len(gens) - 100} more in eval_report.json)")
    md += forgetting_markdown(before, after, stats, summary.get("forgetting_note"))
    warnings = after.get("warnings") or []
    if warnings:
        md += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    text = "\n".join(md) + "\n"
    (run_dir / "eval_report.md").write_text(text)
    return text


_PIPELINE = {"classify": "text-classification", "generate": "text-generation"}


def _front_matter(summary: dict, after: dict, stats: dict | None, run_name: str, datasets: list[str]) -> str:
    """Hugging Face model-card metadata: base_model, library_name, datasets, and the results as
    model-index (https://huggingface.co/docs/hub/model-cards#evaluation-results)."""
    import yaml

    peft_folder = summary["saved_as"] == "adapter"
    rows = (stats or {}).get("metrics", {})
    metrics = []
    for k in _HEADLINE:
        v = after["metrics"].get(k)
        if isinstance(v, (int, float)):
            ci = rows.get(k, {}).get("after_ci")
            metrics.append({"type": k, "value": round(float(v), 4),
                            "name": f"{k} (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else k})
    front: dict = {"base_model": summary["base_model"], "library_name": "peft" if peft_folder else "transformers",
                   "tags": ["tunesmith", summary["method"], summary["task"]], "datasets": datasets}
    if summary.get("predicts") in _PIPELINE:
        front["pipeline_tag"] = _PIPELINE[summary["predicts"]]
    front["model-index"] = [{"name": run_name, "results": [{
        "task": {"type": _PIPELINE.get(summary.get("predicts"), summary["task"]), "name": summary["task"]},
        "dataset": {"name": datasets[0] if datasets else "held-out data", "type": datasets[0] if datasets else "local",
                    "split": after["split"]},
        "metrics": metrics}]}]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---"


def model_card(summary: dict, before: dict | None, after: dict, run_name: str, train_data: str,
               stats: dict | None = None, hyper: dict | None = None) -> str:
    """README.md for the run folder and its saved adapter or model, in Hugging Face's model-card
    format: what it is, its data, method and hyperparameters, before/after results with 95%
    intervals and tests, the forgetting probe, intended use and limits, how to load it.
    `stats`: evaluate.stats.compare_results(before, after); `hyper`: training settings to list."""
    peft_folder = summary["saved_as"] == "adapter"
    datasets = [d.strip() for d in train_data.split(",") if d.strip()]
    lines = [_front_matter(summary, after, stats, run_name, datasets), "",
             f"# {run_name}", "",
             f"A {summary['method']} fine-tune of `{summary['base_model']}` for {summary['task']}, trained with "
             f"tunesmith on `{train_data}` ({summary['format']} data).", ""]
    if summary.get("labels"):
        lines += [f"Labels (id order): {', '.join(summary['labels'])}. They are stored in this folder's config.json "
                  "(id2label / label2id).", ""]
    if summary.get("data_summary"):
        lines += ["## Data", "", summary["data_summary"], ""]
    lines += [f"## Results on the held-out {after['split']} split ({after['examples']} examples)", ""]
    line = headline(before, stats)
    lines += [line, ""] if line else []
    lines += metric_table(before, after, stats) + [""]
    notes = stats_notes(stats, after["examples"])
    lines += notes + [""] if notes else []
    lines += [x for x in forgetting_markdown(before, after, stats, summary.get("forgetting_note")) if not x.startswith("|")]
    lines += ["", "## Intended use and limits", "",
              f"- Made for inputs like its training data (`{train_data}`); the scores above hold for data drawn "
              "the same way. On other text they are unknown: watch a deployment with `tunesmith monitor` "
              f"(runs/{run_name} --data NEW_INPUTS), which tests new inputs and predictions for drift.",
              f"- The held-out split has {after['examples']} examples: read the intervals, not only the point values."]
    if "ece" in after["metrics"]:
        lines.append(f"- Its probabilities are calibrated to ECE {after['metrics']['ece']:.3f} on that split "
                     "(reliability.png in the run folder); use them as confidences only that far.")
    if "forgetting_perplexity" in after["metrics"] or "general_qa_accuracy" in after["metrics"]:
        lines.append("- Fine-tuning can erode what the base model knew: the forgetting section above measures that on "
                     "general text and general questions; the base model's own limits and biases remain.")
    lines += ["", "## Use", "", "```bash", f"tunesmith predict runs/{run_name} --text \"...\"", "```", ""]
    if peft_folder:
        auto = "AutoModelForSequenceClassification" if summary.get("labels") else "AutoModelForCausalLM"
        cfg_arg = ", config=AutoConfig.from_pretrained(ADAPTER)" if summary.get("labels") else ""
        lines += ["Without tunesmith (BASE: the base model's folder or hub id):", "", "```python",
                  f"from transformers import AutoConfig, {auto}", "from peft import PeftModel",
                  f"ADAPTER = \"runs/{run_name}/adapter\"",
                  f"base = {auto}.from_pretrained(BASE{cfg_arg})",
                  "model = PeftModel.from_pretrained(base, ADAPTER)", "```", ""]
    lines += ["## Training", "", f"- method {summary['method']}: {summary['params']}",
              f"- {summary['steps']} steps, precision {summary['precision']}, device {summary['device']}, "
              f"{summary['train_seconds']:.0f} s"]
    lines += [f"- {k}: {v}" for k, v in (hyper or {}).items()]
    lines += ["- the full resolved config is the run folder's config.yaml; the report is eval_report.md", ""]
    return "\n".join(lines)


def plot_curves(metrics_path: Path, out_png: Path) -> None:
    """Training loss per logged step and validation metrics per evaluation."""
    plt = pyplot()
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval" and "loss" in r]  # no validation split: no points
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        ax1.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax1.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
        shown = [k for k, v in evals[0].items() if isinstance(v, float) and k not in ("loss", "epoch", "elapsed_s")]
        key = next((k for k in ("accuracy", "perplexity") if k in shown), shown[0])  # e.g. regression: mae
        ax2.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", color="tab:green")
        ax2.set_title(f"validation {key}")
        ax2.set_xlabel("step")
    ax1.set_title("loss")
    ax1.set_xlabel("step")
    ax1.legend()
    save_figure(fig, out_png)


def plot_pref_curves(metrics_path: Path, out_png: Path) -> bool:
    """Per training step of a pairwise objective: chosen and rejected rewards and their margin
    (DPO: the implicit rewards beta * log pi/pi_ref) and, for DPO, log pi_ref - log pi on the
    pairs' responses (an estimate of KL(pi_ref || pi) when the reference sampled them).
    Returns False (and writes nothing) when the log has no such rows."""
    plt = pyplot()
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r["kind"] == "train" and "chosen_reward" in r]
    if not rows:
        return False
    steps = [r["step"] for r in rows]
    kl = "ref_logratio" in rows[0]
    fig, axes = plt.subplots(1, 2 if kl else 1, figsize=(10 if kl else 5.5, 3.8), squeeze=False)
    ax = axes[0][0]
    for key, colour in (("chosen_reward", "tab:green"), ("rejected_reward", "tab:red"), ("margin", "tab:blue")):
        ax.plot(steps, [r[key] for r in rows], lw=1, color=colour, label=key.replace("_", " "))
    ax.set_title("rewards per step (DPO: beta log pi/pi_ref)")
    ax.legend(fontsize=8)
    if kl:
        axes[0][1].plot(steps, [r["ref_logratio"] for r in rows], lw=1, color="tab:red")
        axes[0][1].set_title("log pi_ref - log pi on the pairs (KL if sampled from ref)", fontsize=10)
    for a in axes[0]:
        a.set_xlabel("step")
    save_figure(fig, out_png)
    return True
