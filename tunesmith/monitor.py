"""`tunesmith monitor RUN --data NEW`: has what the deployed model sees drifted from its data?

New inputs (and the model's predictions on them) are cut into windows and each window is tested
against a reference sample of the run's own data (evaluate/drift.py has the tests):
- embedding drift: MMD permutation test on the run's static input embeddings (the mean of the
  model's own token-embedding rows over an input's tokens: no forward pass, so it costs what
  tokenising costs; a distribution shift in topic or style moves it);
- length drift (words per input, KS) and vocabulary drift (share of an input's words the
  reference never used, Mann-Whitney U against reference inputs held back from the vocabulary);
- prediction drift, one test per field the run's `predict` returns: the predicted label
  (chi-square), its probability / a score (KS), a generated reply's length (KS).
A window drifts when any test's p-value is below alpha / (number of tests) (Bonferroni), so a
window of unchanged data raises a false alarm with probability at most alpha.

The reference is the run's held-out split (test, else validation, else train), not the examples
it trained on: a model is more confident on those, and its confidence would "drift" on any new
data. Predictions come from the file when it holds them (`tunesmith predict --json` lines, or
`tunesmith serve --request-log`'s lines for one model: an "input" field and the prediction's
fields), else from running the model.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.data.readers import detect_reader, read_records
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import predict_texts
from tunesmith.evaluate.drift import chi2_test, ks_test, mmd_test, oov_rates, oov_test, words
from tunesmith.evaluate.plots import pyplot, save_figure
from tunesmith.runs import LoadedModel, load_run, read_inputs, to_device
from tunesmith.tasks import get_task, load_examples
from tunesmith.tasks.base import unit_key
from tunesmith.train.runtime import make_accelerator

MIN_WINDOW = 20
PREDICT_CHUNK = 64  # texts per predict call: a classifier's predict runs them as one batch


@dataclass
class Reference:
    """What each window is compared with, computed once per run (predictions cached on disk)."""

    description: str
    texts: list[str]
    embeddings: np.ndarray  # (R, H)
    lengths: np.ndarray  # (R,) words per input
    vocab: set[str]  # the words of the first half of the reference
    oov: np.ndarray  # unseen-word shares of the second half, against that vocabulary
    predictions: list[dict[str, Any]]  # the run's predictions without their input


def static_embeddings(loaded: LoadedModel, texts: list[str]) -> np.ndarray:
    """(N, H): the mean of the input-embedding rows of each text's tokens (cut at data.max_length)."""
    from scipy.sparse import csr_matrix

    table = loaded.model.get_input_embeddings().weight.detach().float().cpu().numpy()  # (V, H)
    tok = loaded.tokenizer
    side, n = loaded.cfg.data.truncation_side, loaded.cfg.data.max_length
    tok.truncation_side = side
    # Tokenising a long review only to keep its last 64 tokens costs most of the time: cut each text
    # to 16 characters per kept token first (a token averages ~4 characters of English), on the side
    # truncation drops, so the kept tokens are the same.
    cut = 16 * n
    texts = [t if len(t) <= cut else (t[-cut:] if side == "left" else t[:cut]) for t in texts]
    ids = tok(texts, truncation=True, max_length=n, add_special_tokens=False)["input_ids"]
    lens = np.array([max(len(i), 1) for i in ids])
    rows = np.repeat(np.arange(len(ids)), [len(i) for i in ids])
    cols = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids]) if len(rows) else np.zeros(0, np.int64)
    weights = 1.0 / lens[rows]  # each token 1/len: a mean
    bag = csr_matrix((weights, (rows, cols)), shape=(len(texts), table.shape[0]))  # (N, V)
    return np.asarray(bag @ table, dtype=np.float32)


def run_predictions(loaded: LoadedModel, texts: list[str]) -> list[dict[str, Any]]:
    """The run's predictions ({"label", "probability"}, {"score"}, {"output"}...) without the input."""
    acc, _ = make_accelerator(loaded.cfg.train)
    to_device(loaded.model, acc.device)
    out = []
    for i in range(0, len(texts), PREDICT_CHUNK):
        rows = predict_texts(loaded.model, loaded.tokenizer, texts[i: i + PREDICT_CHUNK], loaded.cfg, loaded.chat,
                             loaded.labels, acc)
        out += [{k: v for k, v in r.items() if k != "input"} for r in rows]
    return out


def _reference_texts(loaded: LoadedModel, size: int, seed: int) -> tuple[list[str], str]:
    cfg = loaded.cfg
    _, _, splits = load_examples(cfg)
    name = next(s for s in ("test", "validation", "train") if splits.get(s))
    examples = list(splits[name])
    random.Random(seed).shuffle(examples)
    texts = [t for t in get_task(cfg.task).sample_inputs(cfg, examples[:size]) if t and t.strip()]
    source = cfg.data.train if isinstance(cfg.data.train, str) else ", ".join(cfg.data.train)
    return texts, f"{len(texts)} inputs of the run's {name} split ({source})"


def build_reference(loaded: LoadedModel, run_dir: Path, size: int = 1000, seed: int = 0) -> Reference:
    texts, description = _reference_texts(loaded, size, seed)
    if len(texts) < 2 * MIN_WINDOW:
        raise TunesmithError(f"{run_dir}: its data gives only {len(texts)} reference inputs; drift tests need "
                             f"at least {2 * MIN_WINDOW}")
    cache = run_dir / "monitor" / "reference.json"
    keys = [unit_key(t) for t in texts]
    preds = None
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            preds = saved["predictions"] if saved.get("keys") == keys else None
        except (json.JSONDecodeError, KeyError):
            preds = None  # a damaged cache is recomputed, not trusted
    if preds is None:
        preds = run_predictions(loaded, texts)
        cache.parent.mkdir(parents=True, exist_ok=True)
        _write(cache, json.dumps({"keys": keys, "predictions": preds}))
    docs = [words(t) for t in texts]
    half = len(texts) // 2  # texts are already in a seeded random order
    vocab = {w for d in docs[:half] for w in d}
    return Reference(description, texts, static_embeddings(loaded, texts), np.array([len(d) for d in docs]),
                     vocab, oov_rates(docs[half:], vocab), preds)


def _prediction_tests(ref: list[dict], new: list[dict]) -> dict[str, dict]:
    out = {}
    for field in ref[0]:
        r, n = [p[field] for p in ref], [p[field] for p in new]
        if field == "output":  # generated text: its length
            out["output_words"] = ks_test([len(words(x)) for x in r], [len(words(x)) for x in n])
        elif isinstance(r[0], str):
            out[f"predicted_{field}"] = chi2_test(r, n)
        else:
            out[field] = ks_test(r, n)
    return out


def test_window(ref: Reference, embeddings: np.ndarray, texts: list[str], preds: list[dict] | None,
                alpha: float = 0.05, permutations: int = 300, seed: int = 0) -> dict[str, Any]:
    """Every drift test of one window against the reference, and the window's verdict."""
    docs = [words(t) for t in texts]
    tests = {"embedding": mmd_test(ref.embeddings, embeddings, permutations, seed),
             "length": ks_test(ref.lengths, [len(d) for d in docs]),
             "vocabulary": oov_test(ref.oov, docs, ref.vocab)}
    if preds is not None:
        tests.update(_prediction_tests(ref.predictions, preds))
    threshold = alpha / len(tests)
    fired = [name for name, t in tests.items() if t["p"] < threshold]
    return {"size": len(texts), "tests": tests, "threshold": threshold, "fired": fired, "drift": bool(fired)}


def read_new_inputs(path: str | Path, loaded: LoadedModel) -> tuple[list[str], list[dict] | None]:
    """(texts, logged predictions or None). Lines with an "input" field are predictions as
    `tunesmith predict --json` prints them: every line must then carry the fields the run predicts.

    Raises:
        TunesmithError naming the file and line of a bad record, or an empty file.
    """
    p = Path(path)
    if not p.is_file():
        raise TunesmithError(f"input file not found: {p.absolute()}")
    records = [] if detect_reader(p) == "text" else read_records(p)
    if records and "input" in records[0].fields:
        want = None
        texts, preds = [], []
        for rec in records:
            f = rec.fields
            if not isinstance(f.get("input"), str):
                raise TunesmithError(f"{rec.where}: field 'input': expected text, got {type(f.get('input')).__name__}")
            pred = {k: v for k, v in f.items() if k != "input"}
            want = want or sorted(pred)
            if sorted(pred) != want:
                raise TunesmithError(f"{rec.where}: prediction fields {sorted(pred)} differ from the first line's {want}")
            texts.append(f["input"])
            preds.append(pred)
        return texts, preds
    texts = read_inputs(p, loaded.cfg)
    if not texts:
        raise TunesmithError(f"{p}: no inputs in the file")
    return texts, None


def read_request_log(path: str | Path, model: str | None, run_dir: Path) -> tuple[list[str], list[dict], str]:
    """(texts, logged fields, model id) of one model's lines in a `tunesmith serve --request-log` file.
    `model`: the served model id to keep (default: the only one in the log, else the run folder's
    name, the id the server gives a run it was not told to name).

    Raises:
        TunesmithError naming the file and line of a line that is not a log record, or when the log
        has no line of the model.
    """
    p = Path(path)
    if not p.is_file():
        raise TunesmithError(f"request log not found: {p.absolute()}")
    rows: list[tuple[int, dict]] = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TunesmithError(f"{p}:line {n}: not a JSON line ({e.msg}); is this a tunesmith serve "
                                     "--request-log file?") from None
            if not isinstance(rec, dict):
                raise TunesmithError(f"{p}:line {n}: expected a JSON object, got {type(rec).__name__}")
            for field in ("model", "input"):
                if not isinstance(rec.get(field), str):
                    raise TunesmithError(f"{p}:line {n}: field '{field}': expected text, got "
                                         f"{type(rec.get(field)).__name__}")
            rows.append((n, rec))
    models = sorted({r["model"] for _, r in rows})
    if model is None:
        model = models[0] if len(models) == 1 else run_dir.name
    kept = [(n, r) for n, r in rows if r["model"] == model]
    if not kept:
        raise TunesmithError(f"{p}: no request of model '{model}' in the log (it has: {', '.join(models) or 'none'}); "
                             "name the run's model id with --model NAME")
    meta = {"time", "model", "endpoint", "input"}
    preds = [{k: v for k, v in r.items() if k not in meta} | {"_line": n} for n, r in kept]
    return [r["input"] for _, r in kept], preds, model


def _logged_fields(preds: list[dict], ref: list[dict], path: Path) -> list[dict]:
    """A request log's lines cut to the fields the run predicts. A /score line's "score" stands for
    the run's one numeric prediction (a reward run's `predict` calls it "reward")."""
    want = list(ref[0])
    out = []
    for p in preds:
        row = {}
        for field in want:
            value = p.get(field, p.get("score") if len(want) == 1 else None)
            if value is None:
                raise TunesmithError(f"{path}:line {p['_line']}: no '{field}' field; this run predicts {want} "
                                     f"(the line has {sorted(k for k in p if k != '_line')}): a request to another "
                                     "endpoint than the run's?")
            row[field] = value
        out.append(row)
    return out


def _check_logged(preds: list[dict], ref: list[dict], path: Path) -> None:
    if sorted(preds[0]) != sorted(ref[0]):
        raise TunesmithError(f"{path}: its predictions have the fields {sorted(preds[0])}, but this run predicts "
                             f"{sorted(ref[0])} (tunesmith predict RUN --file INPUTS --json writes them)")


def _windows(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive windows of `size`; a last one shorter than MIN_WINDOW joins the one before."""
    bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_WINDOW:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def monitor(run: str | Path, data: str | Path | None = None, window: int = 500, reference: int = 1000,
            alpha: float = 0.05, out: str | Path | None = None, permutations: int = 300, seed: int = 0,
            request_log: str | Path | None = None, model: str | None = None) -> dict[str, Any]:
    """Test new inputs (and predictions) for drift against the run's data, window by window.
    The inputs: `data` (a file of inputs or of predictions), or `request_log` (a `tunesmith serve
    --request-log` file; its lines of model id `model`, see read_request_log). Writes report.json,
    report.md and drift.png to `out` (default RUN/monitor/<data file's name>).

    Raises:
        TunesmithError for a bad run, file, line or setting, before anything is written.
    """
    if (data is None) == (request_log is None):
        raise TunesmithError("monitor: give the new inputs as --data FILE or --request-log FILE (one of them)")
    if model is not None and request_log is None:
        raise TunesmithError("--model: only with --request-log (it picks that model's lines of the log)")
    if window < MIN_WINDOW:
        raise TunesmithError(f"--window: at least {MIN_WINDOW} inputs per window (got {window})")
    if not 0 < alpha < 1:
        raise TunesmithError(f"--alpha: between 0 and 1 (got {alpha})")
    run_dir, path = Path(run), Path(data if data is not None else request_log)
    t0 = time.perf_counter()
    loaded = load_run(run_dir)
    if request_log is not None:
        texts, preds, model = read_request_log(path, model, run_dir)
    else:
        texts, preds = read_new_inputs(path, loaded)
    if len(texts) < MIN_WINDOW:
        raise TunesmithError(f"{path}: {len(texts)} inputs; a drift test needs at least {MIN_WINDOW}")
    ref = build_reference(loaded, run_dir, reference, seed)
    t_ref = time.perf_counter()
    if request_log is not None:
        preds = _logged_fields(preds, ref.predictions, path)
    elif preds is not None:
        _check_logged(preds, ref.predictions, path)
    source = (f"from the server's request log (model '{model}')" if request_log is not None else
              "logged in the file" if preds is not None else "computed by the run")
    preds = preds if preds is not None else run_predictions(loaded, texts)
    t_pred = time.perf_counter()
    emb = static_embeddings(loaded, texts)
    windows = []
    for i, (s, e) in enumerate(_windows(len(texts), window)):
        w = test_window(ref, emb[s:e], texts[s:e], preds[s:e], alpha, permutations, seed + i)
        windows.append({"index": i, "start": s, "end": e, **w})
    t_end = time.perf_counter()
    drifted = [w["index"] for w in windows if w["drift"]]
    report = {
        "run": str(run_dir), "data": str(path), "inputs": len(texts), "window": window, "alpha": alpha,
        "reference": ref.description, "predictions": source, "windows": windows,
        "verdict": (f"drift in {len(drifted)} of {len(windows)} windows (first: window {drifted[0]})" if drifted
                    else f"no drift detected in {len(windows)} windows"),
        "drift": bool(drifted),
        "seconds": {"load_and_reference": round(t_ref - t0, 2), "predictions": round(t_pred - t_ref, 2),
                    "tests": round(t_end - t_pred, 2)},
    }
    out_dir = Path(out) if out else run_dir / "monitor" / path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_windows(report, out_dir / "drift.png")
    _write(out_dir / "report.md", monitor_markdown(report))
    _write(out_dir / "report.json", json.dumps(report, indent=2))
    report["out"] = str(out_dir)
    return report


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # whole or not at all


def _detail(name: str, t: dict) -> str:
    if "top_unseen" in t:
        return (f"unseen-word share {t['reference_mean']:.3f} -> {t['new_mean']:.3f}"
                + (f"; commonest unseen: {', '.join(t['top_unseen'][:6])}" if t["top_unseen"] else ""))
    if "reference_mean" in t:
        return f"mean {t['reference_mean']:.3f} -> {t['new_mean']:.3f}"
    if "new" in t:
        return "; ".join(f"{c} {t['reference'][c]:.2f} -> {t['new'][c]:.2f}" for c in t["new"])
    return f"MMD^2 {t['statistic']:.4g} (bandwidth {t['bandwidth']:.3g})"


def monitor_markdown(r: dict[str, Any]) -> str:
    names = list(r["windows"][0]["tests"])
    lines = [f"# Drift report: {Path(r['run']).name} on {Path(r['data']).name}", "",
             f"**{r['verdict']}.**", "",
             f"- new inputs: {r['inputs']} in windows of {r['window']}; predictions {r['predictions']}",
             f"- reference: {r['reference']}",
             f"- a window drifts when a test's p-value is below alpha / tests = {r['alpha']} / {len(names)} "
             f"= {r['windows'][0]['threshold']:.4f} (Bonferroni): a window of unchanged data raises a false alarm with "
             f"probability at most {r['alpha']}", "",
             "| window | inputs | " + " | ".join(names) + " | drift |", "|---" * (len(names) + 3) + "|"]
    for w in r["windows"]:
        cells = [f"**{w['tests'][n]['p']:.2g}**" if n in w["fired"] else f"{w['tests'][n]['p']:.2g}" for n in names]
        lines.append(f"| {w['index']} | {w['start']}-{w['end'] - 1} | " + " | ".join(cells)
                     + f" | {'yes: ' + ', '.join(w['fired']) if w['drift'] else 'no'} |")
    lines += ["", "p-values per test (bold: below the threshold). What changed, per window:", ""]
    for w in r["windows"]:
        lines.append(f"- window {w['index']}: " + "; ".join(f"{n}: {_detail(n, t)}" for n, t in w["tests"].items()))
    lines += ["", "Tests: embedding = MMD (Gaussian kernel, median-heuristic bandwidth) permutation test on the run's "
              "static input embeddings; length = Kolmogorov-Smirnov on words per input; vocabulary = Mann-Whitney U on "
              "each input's share of words the reference never used; predicted_* = chi-square on label counts; "
              "probability / score / output_words = Kolmogorov-Smirnov.", "", "![p-values per window](drift.png)"]
    return "\n".join(lines) + "\n"


def plot_windows(r: dict[str, Any], out_png: Path) -> None:
    """-log10 p per test over the windows, with the alarm threshold."""
    plt = pyplot()
    idx = [w["index"] for w in r["windows"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(idx) + 4), 4))
    for name in r["windows"][0]["tests"]:
        ax.plot(idx, [-np.log10(max(w["tests"][name]["p"], 1e-300)) for w in r["windows"]], "o-", ms=3, lw=1,
                label=name)
    ax.axhline(-np.log10(r["windows"][0]["threshold"]), color="tab:red", ls="--", lw=1, label="alarm threshold")
    for w in r["windows"]:
        if w["drift"]:
            ax.axvspan(w["index"] - 0.4, w["index"] + 0.4, color="tab:red", alpha=0.08)
    ax.set_xlabel("window (in input order)")
    ax.set_ylabel("-log10 p")
    ax.set_title(f"drift tests per window of {r['window']} inputs")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, out_png)
