"""What a search leaves behind: the results table (terminal, CSV, Markdown), the importance and
parallel-coordinate plots (optuna's matplotlib plots) and the best trial's config."""
from __future__ import annotations

import csv
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from tunesmith.search.space import decode_params


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count towards the study's N: all but those whose process died and that
    were retried (their retry counts instead)."""
    retried = {t.user_attrs["retry_of"][-1] for t in trials if t.user_attrs.get("retry_of")}
    return [t for t in trials if t.number not in retried and t.state != TrialState.WAITING]


def detail(t: FrozenTrial, trials: list[FrozenTrial]) -> str:
    """Why a trial ended as it did, in a few words."""
    retry = next((u.number for u in trials if (u.user_attrs.get("retry_of") or [None])[-1] == t.number), None)
    text = t.user_attrs.get("detail") or ""
    if t.state == TrialState.FAIL and not text:
        text = "its search process stopped without a result"
    if retry is not None:
        text += f"; retried as trial {retry}"
    if t.user_attrs.get("retry_of"):
        text = f"retry of trial {t.user_attrs['retry_of'][-1]}" + (f"; {text}" if text else "")
    return text.strip("; ")


def rows(study: optuna.Study, metric: str, also: list[str] = ()) -> list[dict[str, Any]]:
    """One row per trial, WAITING slots left out; with further objectives, their values and
    whether the trial is on the Pareto front."""
    trials = study.get_trials(deepcopy=False)
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    front = {t.number for t in study.best_trials} if also else set()
    out = []
    for t in trials:
        if t.state == TrialState.WAITING:
            continue
        params = decode_params(t.params)
        if also:  # a multi-objective trial has values, one per objective (complete trials only)
            values = dict(zip([metric, *also], t.values or [None] * (1 + len(also))))
            values["pareto"] = "yes" if t.number in front else ""
        else:
            values = {metric: t.value if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else None}
        out.append({"trial": t.number, "state": t.state.name.lower(), **values,
                    **{n: params.get(n) for n in names},
                    "best_step": t.user_attrs.get("best_step"), "steps": t.user_attrs.get("steps"),
                    "seconds": t.user_attrs.get("seconds"),
                    "test": t.user_attrs.get("test_value"), "detail": detail(t, trials),
                    "search_rss_mb": t.user_attrs.get("search_rss_mb")})
    return out


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")


def markdown(table: list[dict[str, Any]], drop: tuple[str, ...] = ("search_rss_mb",)) -> str:
    if not table:
        return "(no trials yet)"
    cols = [c for c in table[0] if c not in drop and any(r.get(c) not in (None, "") for r in table)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in table]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    """Write through a temporary file: two processes finishing together never leave half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_tables(table: list[dict[str, Any]], search_dir: Path, header: str) -> tuple[Path, Path]:
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    _write(search_dir / "results.csv", buf.getvalue())
    _write(search_dir / "results.md", f"{header}\n\n{markdown(table)}\n")
    return search_dir / "results.csv", search_dir / "results.md"


def plot(study: optuna.Study, search_dir: Path, metric: str, also: list[str] = ()) -> tuple[list[Path], list[str]]:
    """importance.png and parallel_coordinate.png (of the validation metric), and with further
    objectives pareto_front.png; the notes say why one was not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    varied = [n for n in dict.fromkeys(k for t in done for k in t.params)
              if len({repr(t.params.get(n)) for t in done}) > 1]
    paths, notes = [], []
    if len(done) < 2 or not varied:
        return [], [f"no plots: they need 2 completed trials whose parameters differ ({len(done)} completed)"]
    first = {"target": lambda t: t.values[0]} if also else {}  # several objectives: these two show the first
    drawings = [("importance", lambda: ovm.plot_param_importances(study, target_name=metric, **first)),
                ("parallel_coordinate", lambda: ovm.plot_parallel_coordinate(study, target_name=metric, **first))]
    if len(also) in (1, 2):  # optuna draws fronts of 2 or 3 objectives
        drawings.append(("pareto_front", lambda: ovm.plot_pareto_front(study, target_names=[metric, *also])))
    elif also:
        notes.append(f"no pareto_front.png: optuna draws fronts of 2 or 3 objectives, this search has {1 + len(also)}")
    with warnings.catch_warnings(record=True) as caught:  # optuna's notes go into ours
        warnings.simplefilter("always")
        for name, draw in drawings:
            fig = draw().figure  # each returns one matplotlib Axes
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            path = search_dir / f"{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    notes += [f"plots: {w.message}" for w in caught if not issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    return paths, notes


def write_best_config(cfg_dump: dict[str, Any], path: Path, header: list[str]) -> None:
    """The best trial's whole config as YAML, headed by how to run it and what it scored."""
    body = yaml.safe_dump(cfg_dump, sort_keys=False)
    _write(path, "".join(f"# {line}\n" for line in header) + body)
