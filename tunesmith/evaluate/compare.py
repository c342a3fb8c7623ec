"""`tunesmith compare RUN RUN ...`: finished runs side by side, each metric with its 95% interval,
and every run against the first with the change, its interval and a test (paired on the examples
both scored: McNemar for 0/1 scores, the paired bootstrap otherwise; unpaired when they scored
different evaluation sets, which the table says)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.evaluate.report import _HEADLINE, _ci, _fmt, _p, verdict
from tunesmith.evaluate.stats import compare_groups, intervals, point_metrics


def _check_groups(groups: Any, where: str) -> list[dict[str, Any]]:
    """Row groups as evaluate writes them; a clear error naming the field of a broken one."""
    if not isinstance(groups, list):
        raise TunesmithError(f"{where}: expected a list of row groups")
    for i, g in enumerate(groups):
        at = f"{where}[{i}]"
        if not isinstance(g, dict) or not {"name", "keys", "columns", "metrics"} <= set(g):
            raise TunesmithError(f"{at}: a row group needs name, keys, columns and metrics")
        for col, values in g["columns"].items():
            if not isinstance(values, list) or len(values) != len(g["keys"]):
                raise TunesmithError(f"{at}.columns.{col}: {len(values) if isinstance(values, list) else 'no'} values "
                                     f"for {len(g['keys'])} keys")
        for metric, spec in g["metrics"].items():
            missing = [c for c in spec[1:] if isinstance(c, str) and c not in g["columns"]]
            if missing:
                raise TunesmithError(f"{at}.metrics.{metric}: column(s) {', '.join(missing)} not in the group")
    return groups


def load_evaluation(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(name, evaluation) of a run folder (its eval_report.json, the trained model) or of a JSON
    file that `tunesmith eval --json` wrote.

    Raises:
        TunesmithError naming the file (and line, for bad JSON) when it cannot be compared.
    """
    p = Path(path)
    if not p.exists():
        raise TunesmithError(f"not found: {p.absolute()}")
    file = p / "eval_report.json" if p.is_dir() else p
    if not file.is_file():
        raise TunesmithError(f"{file}: not found (a run folder gets it when training finishes; or give the JSON "
                             "file of `tunesmith eval RUN --data FILE --json OUT`)")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TunesmithError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise TunesmithError(f"{file}: not a UTF-8 text file") from None
    result = doc.get("after") if isinstance(doc, dict) and "after" in doc else doc
    if not isinstance(result, dict) or "metrics" not in result:
        raise TunesmithError(f"{file}: not an evaluation (expected 'metrics', or a run report's 'after')")
    field = "after.rows" if result is not doc else "rows"
    if not result.get("rows"):
        raise TunesmithError(f"{file}: no per-example scores ('{field}'); it was written by an older tunesmith: "
                             "re-evaluate with `tunesmith eval RUN --data FILE --json OUT` and compare that file")
    _check_groups(result["rows"], f"{file}: {field}")
    return (p.name if p.is_dir() else p.stem), result


def compare_runs(paths: list[str | Path], resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Every run's metrics with intervals, and each run after the first against the first.

    Returns:
        {"runs": [names], "metrics": {run: {metric: {"value", "ci"}}}, "vs_first": {run: {metric: row}},
         "unpaired": {run: [group names]}} with rows as evaluate.stats.compare_groups gives them.
    """
    if len(paths) < 2:
        raise TunesmithError("compare: give at least two runs (or evaluation JSON files)")
    loaded = [load_evaluation(p) for p in paths]
    names = [n if [m for m, _ in loaded].count(n) == 1 else f"{n} ({i + 1})" for i, (n, _) in enumerate(loaded)]
    out: dict[str, Any] = {"runs": names, "resamples": resamples, "level": level, "metrics": {}, "vs_first": {},
                           "unpaired": {}}
    for name, (_, result) in zip(names, loaded):
        vals = {}
        for g in result["rows"]:
            if g["keys"]:
                point, cis = point_metrics(g), intervals(g, resamples, seed, level)
                vals.update({m: {"value": point[m], "ci": cis[m]} for m in g["metrics"]})
        out["metrics"][name] = vals
    base = {g["name"]: g for g in loaded[0][1]["rows"] if g["keys"]}
    for name, (_, result) in zip(names[1:], loaded[1:]):
        rows, unpaired = {}, []
        for g in result["rows"]:
            if g["name"] in base and g["keys"]:
                r = compare_groups(base[g["name"]], g, resamples, seed, level)
                rows.update(r)
                if r and not next(iter(r.values()))["paired"]:
                    unpaired.append(g["name"])
        out["vs_first"][name], out["unpaired"][name] = rows, unpaired
    if not any(out["vs_first"].values()):
        raise TunesmithError(f"compare: the runs share no metric with per-example scores "
                             f"({', '.join(f'{n}: {sorted(m)}' for n, m in out['metrics'].items())})")
    return out


def compare_markdown(c: dict[str, Any]) -> str:
    """The side-by-side table, then each run against the first."""
    runs, first = c["runs"], c["runs"][0]
    metrics = [m for m in _HEADLINE if any(m in c["metrics"][r] for r in runs)]
    metrics += sorted({m for r in runs for m in c["metrics"][r]} - set(metrics))
    lines = ["| metric | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for m in metrics:
        cells = [f"{_fmt(c['metrics'][r][m]['value'])}{_ci(c['metrics'][r][m]['ci'])}" if m in c["metrics"][r] else "-"
                 for r in runs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for run in runs[1:]:
        rows = c["vs_first"][run]
        if not rows:
            lines += ["", f"**{run} vs {first}**: no metric in common"]
            continue
        lines += ["", f"**{run} vs {first}** (change = {run} - {first})", "",
                  "| metric | change [95% CI] | test | p | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {_fmt(rows[m]['change'], '+')}{_ci(rows[m]['change_ci'])} | {rows[m]['test']} | {_p(rows[m]['p'])} "
                  f"| {verdict(m, rows[m])} |" for m in metrics if m in rows]
        if c["unpaired"][run]:
            lines += ["", f"Not paired ({', '.join(c['unpaired'][run])}): {run} and {first} were evaluated on different "
                      "examples, so the test compares two independent samples; evaluate both on one file for a paired test."]
    lines += ["", f"Intervals: {c['level']:.0%} bootstrap percentile intervals over examples ({c['resamples']} resamples, "
              "seeded). Verdicts at the 5% level, metric by metric."]
    return "\n".join(lines)
