"""Before/after evaluation report (JSON + Markdown) and the training-curve plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_HEADLINE = ["accuracy", "f1_macro", "precision_macro", "recall_macro", "loss", "perplexity", "token_accuracy",
             "exact_match", "contains", "margin", "reward", "positive_share", "kl", "completion_tokens", "tax_perplexity",
             "mae", "rmse", "pearson", "spearman"]


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _short(text: str, n: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell(s: dict) -> str:
    if "label" in s:
        return f"{s['label']} ({s['probability']:.2f})"
    if "output" in s:
        return _short(s["output"], 120).replace("|", "\\|")
    return " ".join(f"{v:.3f}" for k, v in s.items() if k != "input")  # a reward, a predicted value


def comparison_markdown(before: dict | None, after: dict) -> str:
    """The 'untrained vs trained' tables: headline metrics, then the same sample inputs."""
    lines = [f"Evaluated on the **{after['split']}** split ({after['examples']} examples).", "",
             "| metric | before | after |", "|---|---|---|"]
    for k in _HEADLINE:
        if k in after["metrics"]:
            b = _fmt(before["metrics"][k]) if before else "-"
            lines.append(f"| {k} | {b} | {_fmt(after['metrics'][k])} |")
    if after.get("per_source"):  # a data mix: how each source fares, before and after
        lines += ["", "| source | examples | metric | before | after |", "|---|---|---|---|---|"]
        for name, res in after["per_source"].items():
            b_res = (before or {}).get("per_source", {}).get(name)
            for k in [k for k in _HEADLINE if k in res["metrics"]][:2]:
                b = _fmt(b_res["metrics"][k]) if b_res else "-"
                lines.append(f"| `{name}` | {res['examples']} | {k} | {b} | {_fmt(res['metrics'][k])} |")
    lines += ["", "| input | before | after |", "|---|---|---|"]
    for i, s in enumerate(after["samples"]):
        b = _cell(before["samples"][i]) if before else "-"
        lines.append(f"| {_short(s['input'], 70).replace('|', '/')} | {b} | {_cell(s)} |")
    return "\n".join(lines)


def single_markdown(result: dict) -> str:
    """One model's evaluation (for `tunesmith eval`): headline metrics and sample outputs."""
    lines = [f"Evaluated {result['examples']} examples.", ""]
    lines += [f"> warning: {w}" for w in result.get("warnings", [])] + ([""] if result.get("warnings") else [])
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(result['metrics'][k])} |" for k in _HEADLINE if k in result["metrics"]]
    lines += ["", "| input | output |", "|---|---|"]
    lines += [f"| {_short(s['input'], 70).replace('|', '/')} | {_cell(s)} |" for s in result["samples"]]
    return "\n".join(lines)


def write_report(run_dir: Path, before: dict | None, after: dict, summary: dict) -> str:
    """Write eval_report.json and eval_report.md; returns the Markdown."""
    (run_dir / "eval_report.json").write_text(json.dumps({"summary": summary, "before": before, "after": after}, indent=2))
    md = [f"# Run report: {run_dir.name}", "",  # the folder's name: output.dir may not contain output.name
          f"- task: {summary['task']}, method: {summary['method']}, base: `{summary['base_model']}`",
          f"- {summary['params']}", f"- precision: {summary['precision']}, device: {summary['device']}",
          f"- steps: {summary['steps']}, train time: {summary['train_seconds']:.0f} s, total: {summary['wall_seconds']:.0f} s",
          f"- best validation {summary['best_metric']}: {_fmt(summary['best_value'])} (step {summary['best_step']})", "",
          "## Before vs after training", "", comparison_markdown(before, after)]
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
    warnings = after.get("warnings") or []
    if warnings:
        md += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    text = "\n".join(md) + "\n"
    (run_dir / "eval_report.md").write_text(text)
    return text


def model_card(summary: dict, before: dict | None, after: dict, run_name: str, train_data: str) -> str:
    """README.md for the saved adapter or model: what it is, how it scored, how to load it."""
    peft_folder = summary["saved_as"] == "adapter"
    tags = ["tunesmith", summary["method"], summary["task"]]
    front = {"base_model": summary["base_model"], "library_name": "peft" if peft_folder else "transformers",
             "tags": tags}
    lines = ["---"] + [f"{k}: {v}" if not isinstance(v, list) else f"{k}:\n" + "\n".join(f"- {x}" for x in v)
                       for k, v in front.items()] + ["---", "",
             f"# {run_name}", "",
             f"A {summary['method']} fine-tune of `{summary['base_model']}` for {summary['task']}, trained with "
             f"tunesmith on `{train_data}` ({summary['format']} data).", ""]
    if summary.get("labels"):
        lines += [f"Labels (id order): {', '.join(summary['labels'])}. They are stored in this folder's config.json "
                  "(id2label / label2id).", ""]
    lines += [f"## Results on the held-out {after['split']} split ({after['examples']} examples)", "",
              "| metric | before training | after |", "|---|---|---|"]
    for k in _HEADLINE:
        if k in after["metrics"]:
            b = _fmt(before["metrics"][k]) if before and k in before["metrics"] else "-"
            lines.append(f"| {k} | {b} | {_fmt(after['metrics'][k])} |")
    lines += ["", "## Use", "", "```bash", f"tunesmith predict runs/{run_name} --text \"...\"", "```", ""]
    if peft_folder:
        auto = "AutoModelForSequenceClassification" if summary.get("labels") else "AutoModelForCausalLM"
        cfg_arg = ", config=AutoConfig.from_pretrained(ADAPTER)" if summary.get("labels") else ""
        lines += ["Without tunesmith (BASE: the base model's folder or hub id):", "", "```python",
                  f"from transformers import AutoConfig, {auto}", "from peft import PeftModel",
                  f"ADAPTER = \"runs/{run_name}/adapter\"",
                  f"base = {auto}.from_pretrained(BASE{cfg_arg})",
                  "model = PeftModel.from_pretrained(base, ADAPTER)", "```", ""]
    lines += ["## Training", "", f"- {summary['params']}", f"- {summary['steps']} steps, precision {summary['precision']}, "
              f"device {summary['device']}, {summary['train_seconds']:.0f} s",
              "- the full resolved config is the run folder's config.yaml; the report is eval_report.md", ""]
    return "\n".join(lines)


def plot_curves(metrics_path: Path, out_png: Path) -> None:
    """Training loss per logged step and validation metrics per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_pref_curves(metrics_path: Path, out_png: Path) -> bool:
    """Per training step of a pairwise objective: chosen and rejected rewards and their margin
    (DPO: the implicit rewards beta * log pi/pi_ref) and, for DPO, log pi_ref - log pi on the
    pairs' responses (an estimate of KL(pi_ref || pi) when the reference sampled them).
    Returns False (and writes nothing) when the log has no such rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True
