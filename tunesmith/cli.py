"""`tunesmith` command line: a thin dispatch table over the Python API."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tunesmith.errors import TunesmithError

EPILOG = ("Any config field can be overridden as --section.key=value, e.g. --train.epochs=1 --method.r=16; "
          "lists as --method.target_modules=query,value or '--method.target_modules=[query, value]'.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune a pretrained model on your data, locally.",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune from a YAML config; writes a run folder", epilog=EPILOG)
    t.add_argument("config", help="YAML run config (see configs/)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's newest complete checkpoint")
    t.add_argument("--nproc", type=int, help="data-parallel processes on this machine (launches torchrun; one per "
                   "GPU, or CPU processes with gloo). train.batch_size stays the global batch: the result does not "
                   "depend on the process count")
    t.add_argument("--nnodes", type=int, default=1, help="machines in the run (with --nproc; start the same command "
                   "on each, with its --node-rank)")
    t.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0 .. nnodes-1")
    t.add_argument("--rdzv-endpoint", help="HOST:PORT of node 0, where the processes meet (with --nnodes > 1)")

    it = sub.add_parser("init", help="write a starter config for your own data file (detects the task and columns)")
    it.add_argument("file", help="your data: CSV/TSV, JSONL/JSON, Parquet or .txt")
    it.add_argument("--out", help="config file to write (default: print it)")
    it.add_argument("--model", help="base model (default: builtin:all-MiniLM-L6-v2 to classify, "
                    "builtin:SmolLM2-135M-Instruct to generate)")
    it.add_argument("--overwrite", action="store_true")

    # allow_abbrev=False: the config override --task=sft must not be read as an abbreviated --tasks
    e = sub.add_parser("eval", help="evaluate a run or a base model on a data file, or on lm-eval task files",
                       epilog=EPILOG, allow_abbrev=False)
    e.add_argument("model", help="run folder, model folder, hub id, .gguf file or builtin: alias")
    e.add_argument("--data", help="data file to evaluate on (the run's task and metrics)")
    e.add_argument("--lm-eval", dest="lm_eval", metavar="TASKS", help="instead of --data: an lm-evaluation-harness "
                   "task YAML or folder of them, run offline on the model (needs pip install 'tunesmith[lm-eval]')")
    e.add_argument("--tasks", nargs="+", help="[--lm-eval] only these tasks (default: all that TASKS defines)")
    e.add_argument("--limit", type=int, help="[--lm-eval] at most N documents per task")
    e.add_argument("--num-fewshot", type=int, help="[--lm-eval] few-shot examples (default: each task's own)")
    e.add_argument("--batch-size", type=int, default=8, help="[--lm-eval] batch size (default 8)")
    e.add_argument("--chat-template", action="store_true", help="[--lm-eval] prompts through the tokenizer's chat template")
    e.add_argument("--config", help="config with task/columns/template (default: the run's own)")
    e.add_argument("--json", dest="json_out", help="also write the full result to this JSON file")

    cm = sub.add_parser("compare", help="runs side by side: each metric with a 95%% interval, and each run vs the "
                        "first with a paired test")
    cm.add_argument("runs", nargs="+", help="run folders (their eval_report.json) or JSON files of `tunesmith eval --json`")
    cm.add_argument("--json", dest="json_out", help="also write the comparison to this JSON file")
    cm.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    cm.add_argument("--seed", type=int, default=0)

    mo = sub.add_parser("monitor", help="test new inputs (and predictions) for drift from a run's data, window by window")
    mo.add_argument("run", help="the run folder of the deployed model")
    mo.add_argument("--data", help="new inputs: a .txt file (one per line), a data file read through the "
                    "run's data.columns, or `tunesmith predict --json` lines (an 'input' field + the predictions)")
    mo.add_argument("--request-log", metavar="FILE.jsonl", help="instead of --data: the log of `tunesmith serve "
                    "--request-log FILE.jsonl` (its inputs and the served predictions)")
    mo.add_argument("--model", help="with --request-log: the served model id whose requests to test (default: the "
                    "log's only model, else the run folder's name)")
    mo.add_argument("--window", type=int, default=500, help="inputs per window, in file order (default 500)")
    mo.add_argument("--reference", type=int, default=1000, help="reference inputs from the run's held-out split (default 1000)")
    mo.add_argument("--alpha", type=float, default=0.05, help="false-alarm rate per window (default 0.05)")
    mo.add_argument("--out", help="report folder (default RUN/monitor/<data file name>)")
    mo.add_argument("--json", action="store_true", help="print the report as JSON")

    pr = sub.add_parser("predict", help="classify texts or generate replies with a trained run (or several "
                        "adapter runs over one base)")
    pr.add_argument("run", nargs="+", help="run folder(s) or a merged/plain model folder; several adapter runs of one "
                    "base load the base once. "
                    "Name an adapter NAME=RUN_DIR (default name: the folder's name)")
    pr.add_argument("--adapter", action="append", default=[],
                    help="with several runs: answer with this adapter (repeatable; default: each in turn)")
    pr.add_argument("--text", action="append", default=[], help="an input (repeatable)")
    pr.add_argument("--file", help="inputs: a .txt file (one per line), or CSV/JSONL/... read through the run's "
                    "data.columns (its text or prompt column)")
    pr.add_argument("--max-new-tokens", type=int, help="generation length")
    pr.add_argument("--json", action="store_true", help="print JSON lines")

    ad = sub.add_parser("adapters", help="inspect adapters and runs")
    asub = ad.add_subparsers(dest="adapters_command", required=True)
    al = asub.add_parser("list", help="every run / adapter under a folder")
    al.add_argument("folder", nargs="?", default="runs")
    ai = asub.add_parser("info", help="method, rank, targets, size on disk, base model of one run or adapter")
    ai.add_argument("path")
    for sp in (al, ai):
        sp.add_argument("--json", action="store_true")

    mg = sub.add_parser("merge", help="merge a run's adapter into the full-precision base; writes a plain transformers model")
    mg.add_argument("run")
    mg.add_argument("--out", required=True)
    mg.add_argument("--overwrite", action="store_true")

    cb = sub.add_parser("combine", help="combine LoRA adapters of one base into a new run (linear / TIES / DARE ...)")
    cb.add_argument("runs", nargs="+")
    cb.add_argument("--out", required=True, help="new run folder")
    cb.add_argument("--weights", type=float, nargs="+", help="one weight per run (default: equal)")
    cb.add_argument("--how", default="linear", help="linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, magnitude_prune")
    cb.add_argument("--density", type=float, help="fraction of each update kept by ties / dare / magnitude_prune (default 0.5)")
    cb.add_argument("--overwrite", action="store_true")

    mp = sub.add_parser("make-pairs", help="sample continuations of a config's prompts and rank them with its reward: "
                        "preference data for DPO/IPO/KTO", epilog=EPILOG)
    mp.add_argument("config", help="a prompt config (data with a prompt/text column, pref.reward_model or reward_fn)")
    mp.add_argument("--out", required=True, help="folder for <split>.jsonl (train, test, validation)")
    mp.add_argument("--per-prompt", type=int, default=4, help="samples per prompt (default 4)")
    mp.add_argument("--format", default="pair", choices=["pair", "ranking"],
                    help="pair: best vs worst sample; ranking: all samples best first, with scores")
    mp.add_argument("--policy", help="sample from this finished run instead of the config's base model")
    mp.add_argument("--overwrite", action="store_true")

    es = sub.add_parser("estimate", help="peak memory of a run before training (weights, optimizer state, "
                        "activations), and what to change when it will not fit this machine", epilog=EPILOG)
    es.add_argument("config", help="YAML run config")
    es.add_argument("--memory-mb", type=float, metavar="MB", help="plan for this much memory instead of what is "
                    "free now (RAM, or the GPU's)")
    es.add_argument("--json", action="store_true", help="print the estimate as JSON")

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="report what the pipeline makes of a file, with every error", epilog=EPILOG)
    dc.add_argument("file")
    dc.add_argument("--config", help="run config whose data/model settings to use")
    dc.add_argument("--json", nargs="?", const="-", metavar="OUT",
                    help="write the full report (every finding with all its rows) as JSON to OUT; alone: print it")
    dc.add_argument("--markdown", metavar="OUT", help="write the full report as Markdown to OUT")
    dc.add_argument("--no-label-check", action="store_true",
                    help="skip the search for likely label errors (a cross-validated model)")
    dc.add_argument("--token-sample", type=int, default=5_000, metavar="N",
                    help="tokenise a random N examples of a larger file for the token statistics and the "
                    "estimate (0: every example; the other checks always read every row)")
    dc.add_argument("--near-threshold", type=float, default=0.6, metavar="J",
                    help="word 3-gram Jaccard similarity from which rows are near-duplicates (default 0.6)")
    dl = dsub.add_parser("clean", help="write a copy of a file without its duplicate rows and the rows leaked "
                         "from the other side of the config's train/held-out split", epilog=EPILOG)
    dl.add_argument("file")
    dl.add_argument("--config", help="run config (its other data files are checked for leakage)")
    dl.add_argument("--out", required=True, help="the cleaned copy (same extension as FILE)")
    dl.add_argument("--overwrite", action="store_true")

    sv = sub.add_parser("serve", help="serve runs (many LoRA adapters over one base) behind an OpenAI-compatible API")
    sv.add_argument("models", nargs="+", metavar="RUN_OR_MODEL", help="runs and/or a base model; adapter runs of "
                    "one base load it once. Name one NAME=PATH (default: the folder's name; a base: its name_or_path)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", action="append", default=[], help="require this bearer key (repeatable)")
    sv.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="default: the first run's train.precision")
    sv.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together")
    sv.add_argument("--request-log", metavar="FILE.jsonl", help="append one JSON line per finished request (model, "
                    "endpoint, input, prediction or reply) for `tunesmith monitor RUN --request-log FILE`; off by default")
    sv.add_argument("--engine", choices=["tunesmith", "vllm"], default="tunesmith",
                    help="vllm: print the `vllm serve` command for the same folders (and run it where vLLM is installed)")

    se = sub.add_parser("search", help="search hyperparameters: trials of a config over a space (Optuna), with "
                        "pruning; writes a results table, plots and the best config", epilog=EPILOG)
    se.add_argument("config", help="the base run config (YAML); --section.key=value overrides apply to it")
    se.add_argument("--space", help="search space YAML (default: the built-in space for the config's method; "
                    "docs/SEARCH.md)")
    se.add_argument("--trials", type=int, help="trials in the study (a grid: its size)")
    se.add_argument("--parallel", type=int, default=1, help="trials this process runs at once (default 1)")
    se.add_argument("--storage", help="where the study lives: a SQLite file in the search folder (default), "
                    "sqlite:///FILE, FILE.log (journal), or postgresql://USER@HOST:PORT/DB for several processes or machines")
    se.add_argument("--study", help="study name (default: <output.name>-search); the same name continues it")
    se.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe")
    se.add_argument("--pruner", choices=["median", "asha", "none"], default="median",
                    help="stop poor trials at their validations (median of earlier trials, or successive halving)")
    se.add_argument("--budget-steps", type=int, help="start no trial once the study's trials trained this many steps")
    se.add_argument("--seed", type=int, help="sampler seed (default: random; give each process its own)")
    se.add_argument("--threads", type=int, help="torch threads per trial (default: the cores divided by --parallel)")
    se.add_argument("--retrain", action="store_true", help="then train the best config on train+validation and "
                    "score it on the test split")
    se.add_argument("--out", help="search folder (default: the config's output.dir with the study's name)")
    se.add_argument("--also", action="append", metavar="MEASURE", help="a further objective beside the validation "
                    "metric (repeatable): forgetting_perplexity, general_qa_accuracy (generative tasks), train_seconds, "
                    "peak_rss_mb; the search then reports its Pareto front (pareto/trial-N.yaml), without pruning")

    se = sub.add_parser("service", help="a self-hosted fine-tuning service speaking OpenAI's fine-tuning API (files, "
                        "jobs, events, checkpoints) that also serves the models it trains")
    se.add_argument("--data-dir", default="tunesmith-service", help="files, runs and the SQLite database (default "
                    "./tunesmith-service); shared storage when workers run on other machines")
    se.add_argument("--db", help="database URL (default: SQLite in the data dir; postgresql://user@host/db for "
                    "workers on several machines)")
    se.add_argument("--workers", type=int, default=1, help="embedded workers, each training one job at a time "
                    "in a child process (default 1; 0: only `tunesmith worker` processes train)")
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                    help="a base model jobs may fine-tune, as `model=NAME` (repeatable; PATH: a folder, .gguf or "
                    "builtin: alias); the first one counts the tokens of uploads")
    se.add_argument("--max-file-bytes", type=int, help="largest upload (default 512 MB, OpenAI's limit)")
    se.add_argument("--max-example-tokens", type=int, help="longest example an upload may hold (default: the "
                    "first --model's context length)")
    se.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="inference precision of served models")
    se.add_argument("--lease-s", type=float, help="embedded workers' job lease: they heartbeat every lease/3 seconds; "
                    "a dead worker's job is resumed after it (default 60)")

    wk = sub.add_parser("worker", help="train the fine-tuning service's queued jobs (more workers for `tunesmith "
                        "service`, on this or other machines sharing its PostgreSQL and data dir)")
    wk.add_argument("--data-dir", default="tunesmith-service", help="the service's data dir (the same folder, at the "
                    "same path, on every machine: shared storage)")
    wk.add_argument("--db", help="the service's database URL (postgresql://user@host/db for several machines; "
                    "default: SQLite in the data dir, workers on this machine only)")
    wk.add_argument("--workers", type=int, default=1, help="jobs trained at once by this process (default 1)")
    wk.add_argument("--lease-s", type=float, help="a dead worker's job is resumed elsewhere after this many "
                    "seconds without a heartbeat (default 60, or $TUNESMITH_WORKER_LEASE_S)")
    wk.add_argument("--poll-s", type=float, help="how often an idle worker looks for jobs (default 2, or "
                    "$TUNESMITH_WORKER_POLL_S)")

    ky = sub.add_parser("keys", help="the fine-tuning service's API keys: one project per key name")
    ksub = ky.add_subparsers(dest="keys_command", required=True)
    ka = ksub.add_parser("add", help="make a key for project NAME (printed once; only its hash is kept)")
    ka.add_argument("name")
    kl = ksub.add_parser("list", help="every key: name, project, prefix, created, revoked")
    kl.add_argument("--json", action="store_true")
    kr = ksub.add_parser("revoke", help="revoke a key by its project name or key id")
    kr.add_argument("name_or_id")
    for sp in (ka, kl, kr):
        sp.add_argument("--data-dir", default="tunesmith-service")
        sp.add_argument("--db", help="database URL (default: SQLite in the data dir)")

    c = sub.add_parser("config", help="print a resolved config, or every field with its documentation")
    c.add_argument("config", nargs="?", help="YAML run config")
    c.add_argument("--doc", action="store_true", help="list every field, its default and what it does")
    return p


def run(argv: list[str]) -> int:
    args, rest = _parser().parse_known_args(argv)
    if args.command == "train":
        return _train(args, rest)
    elif args.command == "init":
        from tunesmith.starter import starter_config

        _no_overrides(rest)
        text = starter_config(args.file, args.out, args.model, args.overwrite)
        print(f"wrote {args.out}; next: tunesmith data check {args.file} --config {args.out}" if args.out else text)
    elif args.command == "eval" and args.lm_eval:
        from tunesmith.lm_eval_bridge import harness_markdown, lm_eval_run

        _no_overrides(rest)
        if args.data:
            raise TunesmithError("eval: give --data or --lm-eval, not both")
        result = lm_eval_run(args.model, args.lm_eval, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                             batch_size=args.batch_size, chat_template=args.chat_template)
        print(harness_markdown(result))
        if args.json_out:
            _write_atomic(Path(args.json_out), json.dumps(result, indent=2))
    elif args.command == "eval":
        if not args.data:
            raise TunesmithError("eval: give --data FILE (the run's own metrics) or --lm-eval TASKS")
        harness_only = [f for f, v in (("--tasks", args.tasks), ("--limit", args.limit), ("--num-fewshot",
                        args.num_fewshot), ("--chat-template", args.chat_template)) if v]
        if harness_only:
            raise TunesmithError(f"eval: {', '.join(harness_only)} only apply with --lm-eval")
        from tunesmith.evaluate.report import single_markdown
        from tunesmith.runs import evaluate

        from tunesmith.evaluate.stats import compare_results

        result = evaluate(args.model, args.data, args.config, rest)
        for w in result.get("warnings", []):
            print(f"warning: {w}", file=sys.stderr)
        print(single_markdown(result, compare_results(None, result)))
        if args.json_out:
            _write_atomic(Path(args.json_out), json.dumps(result, indent=2))
    elif args.command == "compare":
        from tunesmith.evaluate.compare import compare_markdown, compare_runs

        _no_overrides(rest)
        comparison = compare_runs(args.runs, args.resamples, args.seed)
        print(compare_markdown(comparison))
        if args.json_out:
            _write_atomic(Path(args.json_out), json.dumps(comparison, indent=2))
    elif args.command == "monitor":
        from tunesmith.monitor import monitor, monitor_markdown

        _no_overrides(rest)
        report = monitor(args.run, args.data, args.window, args.reference, args.alpha, args.out,
                         request_log=args.request_log, model=args.model)
        print(json.dumps(report, indent=2) if args.json else monitor_markdown(report) + f"\nwritten to {report['out']}")
        return 1 if report["drift"] else 0
    elif args.command == "predict":
        _no_overrides(rest)
        if not args.text and not args.file:
            raise TunesmithError("predict: give --text or --file")
        texts = args.text + (_read_inputs(args.file, args.run[0].split("=", 1)[-1]) if args.file else [])
        _predict(args, texts)
    elif args.command == "adapters":
        from tunesmith.adapters import adapter_info, format_info, list_adapters

        _no_overrides(rest)
        infos = list_adapters(args.folder) if args.adapters_command == "list" else [adapter_info(args.path)]
        print(json.dumps(infos, indent=2) if args.json else "\n\n".join(format_info(i) for i in infos) or "nothing found")
    elif args.command == "merge":
        from tunesmith.adapters import merge

        _no_overrides(rest)
        print(f"merged model written to {merge(args.run, args.out, args.overwrite)}")
    elif args.command == "combine":
        from tunesmith.adapters import combine

        _no_overrides(rest)
        out = combine(args.runs, args.out, args.weights, args.how, args.density, args.overwrite)
        print(f"combined adapter run written to {out}")
    elif args.command == "make-pairs":
        from tunesmith.pref.pairs import make_pairs

        summary = make_pairs(args.config, args.out, rest, per_prompt=args.per_prompt, fmt=args.format,
                             policy_run=args.policy, overwrite=args.overwrite,
                             on_progress=lambda s, i, n: print(f"\r{s}: {i}/{n} prompts", end="", file=sys.stderr, flush=True))
        print(file=sys.stderr)
        for split, s in summary.items():
            print(f"{split}: {s['rows']} rows from {s['prompts']} prompts ({s['skipped']} skipped: ties or fewer than 2 non-empty samples), mean reward "
                  f"best {s['mean_best_reward']:.3f} / worst {s['mean_worst_reward']:.3f}")
        print(f"written to {args.out}")
    elif args.command == "estimate":
        from tunesmith.tasks.estimate import estimate_config, format_estimate

        report = estimate_config(args.config, rest, available_mb=args.memory_mb)
        print(json.dumps(report, indent=2) if args.json else format_estimate(report))
        return 0 if report["fits"] else 1
    elif args.command == "data" and args.data_command == "clean":
        from tunesmith.tasks.clean import clean_data, format_clean

        print(format_clean(clean_data(args.file, args.config, args.out, rest, args.overwrite)))
    elif args.command == "data":
        from tunesmith.tasks.check import check_data, format_report
        from tunesmith.tasks.check_output import write_reports

        report = check_data(args.file, args.config, rest, label_check=not args.no_label_check,
                            token_sample=args.token_sample or None, near_threshold=args.near_threshold)
        json_file = args.json if args.json not in (None, "-") else None
        write_reports(report, json_file, args.markdown)
        print(json.dumps(report, indent=2, default=str) if args.json == "-" else format_report(report))
        for path in (json_file, args.markdown):
            if path:
                print(f"wrote {path}", file=sys.stderr)
        return 1 if report["problems"] else 0
    elif args.command == "serve":
        _no_overrides(rest)
        if args.engine == "vllm":
            from tunesmith.serve.vllm import run_vllm

            return run_vllm(args.models, args.host, args.port, args.api_key)
        from tunesmith.serve import serve

        serve(args.models, args.host, args.port, args.api_key, args.precision, args.max_batch, args.request_log)
    elif args.command == "search":
        return _search(args, rest)
    elif args.command == "service":
        from tunesmith.service.app import serve_service

        _no_overrides(rest)
        serve_service(args.data_dir, args.db, args.workers, args.host, args.port, args.model,
                      max_file_bytes=args.max_file_bytes, max_example_tokens=args.max_example_tokens,
                      precision=args.precision,
                      worker_options={"lease_s": args.lease_s} if args.lease_s else None)
    elif args.command == "worker":
        from tunesmith.service import require_store_deps

        _no_overrides(rest)
        require_store_deps()
        from tunesmith.service.worker import serve_forever

        serve_forever(args.db, Path(args.data_dir), args.workers, lease_s=args.lease_s, poll_s=args.poll_s)
    elif args.command == "keys":
        from tunesmith.service import require_store_deps

        _no_overrides(rest)
        require_store_deps()
        return _keys(args)
    elif args.command == "config":
        from tunesmith.config import describe_fields, load_config

        if args.doc:
            print("\n".join(describe_fields()))
        elif args.config is None and not any(a.startswith("--data.train") for a in rest):
            raise TunesmithError("config: give a CONFIG.yaml to print it resolved. To start from your own data: "
                                 "tunesmith init YOUR_FILE --out CONFIG.yaml (every field: tunesmith config --doc)")
        else:
            import yaml

            print(yaml.safe_dump(load_config(args.config, rest).model_dump(mode="json"), sort_keys=False))
    return 0


def _keys(args) -> int:
    import time

    from tunesmith.service.store import Store

    store = Store(args.db, Path(args.data_dir))
    store.migrate()
    try:
        if args.keys_command == "add":
            project, key = store.add_key(args.name)
            print(f"{key}\n(project {project['name']} = {project['id']}; shown once: keep it, only its hash is stored)")
        elif args.keys_command == "list":
            keys = store.list_keys()
            day = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
            lines = [f"{k['id']}\t{k['name']}\t{k['project_id']}\t{k['prefix']}...\t{day(k['created_at'])}\t"
                     + (f"revoked {day(k['revoked_at'])}" if k["revoked_at"] else "active") for k in keys]
            print(json.dumps(keys, indent=2) if args.json else "\n".join(lines) or "no keys yet: tunesmith keys add NAME")
        else:
            for k in store.revoke_key(args.name_or_id):
                print(f"revoked {k['id']} ({k['name']}, {k['prefix']}...)")
    finally:
        store.close()
    return 0


def _train(args, rest: list[str]) -> int:
    """Validate the config before the heavy imports (a typo is reported at once), then train;
    Ctrl-C or SIGTERM stops at the next step boundary with a checkpoint that --resume continues,
    and the exit code says which stopped it: 130 (SIGINT) or 143 (SIGTERM), 128 + the signal's number."""
    import signal
    import threading

    from tunesmith.config import check_inputs_exist, load_config
    from tunesmith.errors import TrainingCancelled

    cfg = load_config(args.config, rest)
    check_inputs_exist(cfg)
    if args.nproc is not None or args.nnodes > 1:
        from tunesmith.launch import launch

        return launch(args.config, rest, args.nproc or 1, args.nnodes, args.node_rank, args.rdzv_endpoint, args.resume)
    from tunesmith.train import train

    cancel = threading.Event()
    received: list[int] = []
    parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1

    def stop(signum, frame) -> None:
        if cancel.is_set():
            if parallel:  # torchrun passes a Ctrl-C on to every process: the processes stop together as asked
                return
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint stays)
        cancel.set()
        received.append(signum)
        print(f"\n{signal.Signals(signum).name}: stopping at the next step with a checkpoint"
              + ("" if parallel else " (Ctrl-C again to stop at once)"), file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(cfg, resume=args.resume, cancel=cancel, echo=True)
    except TrainingCancelled as e:
        if int(os.environ.get("RANK", "0")) == 0:
            again = "the same launch command with --resume" if parallel else \
                " ".join(["tunesmith train", args.config, *rest, "--resume"])
            print(f"interrupted: {e}\n  continue: {again}", file=sys.stderr)
        # another process's signal stopped this one: the run was stopped as by SIGTERM (preemption)
        return 128 + (received[0] if received else signal.SIGTERM)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def _search(args, rest: list[str]) -> int:
    """Ctrl-C or SIGTERM stops the running trials at their next step; they are queued again, and
    rerunning the same command continues the study."""
    import signal
    import threading

    from tunesmith.errors import TrainingCancelled
    from tunesmith.search import run_search

    cancel = threading.Event()

    def stop(signum, frame) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print(f"\n{signal.Signals(signum).name}: stopping the running trials (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_search(args.config, args.space, trials=args.trials, parallel=args.parallel, storage=args.storage,
                   study=args.study, sampler=args.sampler, pruner=args.pruner, budget_steps=args.budget_steps,
                   seed=args.seed, retrain=args.retrain, out=args.out, overrides=rest, threads=args.threads,
                   also=args.also, cancel=cancel, echo=True)
    except TrainingCancelled as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def _read_inputs(path: str, run: str) -> list[str]:
    """predict --file: inputs read through the run's (or merged folder's) data settings, before
    any model loads."""
    from tunesmith.config import load_config
    from tunesmith.runs import MERGED_CONFIG, is_run_dir, read_inputs

    own = Path(run) / ("config.yaml" if is_run_dir(run) else MERGED_CONFIG)
    cfg = load_config(own) if own.is_file() else load_config({"data": {"train": "-"}})
    return read_inputs(path, cfg)


def _print_predictions(rows: list[dict], as_json: bool, adapter: str | None = None) -> None:
    for r in rows:
        if adapter:
            r = {"adapter": adapter, **r}
        if as_json:
            print(json.dumps(r))
        elif "label" in r:
            print(f"{r['label']}\t{r['probability']:.3f}\t{r['input']}")
        elif "output" in r:
            print(f">>> {r['input']}\n{r['output']}\n")
        else:  # a score (reward model, regression)
            print("\t".join(f"{v}" for k, v in r.items() if k != "input") + f"\t{r['input']}")


def _predict(args, texts: list[str]) -> None:
    if len(args.run) == 1 and not args.adapter:
        from tunesmith.runs import predict

        _print_predictions(predict(args.run[0], texts, args.max_new_tokens), args.json)
        return
    import time

    from tunesmith.adapter_set import AdapterSet

    named = [r.split("=", 1) if "=" in r else (Path(r).name, r) for r in args.run]
    t0 = time.perf_counter()
    aset = AdapterSet()
    for name, path in named:
        aset.add(name, path)
    print(f"loaded base + {len(named)} adapter(s) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    for name in args.adapter or aset.names:
        switch = aset.use(name)
        if not args.json:
            print(f"## adapter {name} (switch {switch * 1e3:.2f} ms)")
        _print_predictions(aset.predict(texts, name, args.max_new_tokens), args.json, name)


def _write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file beside it, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _no_overrides(rest: list[str]) -> None:
    if rest:
        raise TunesmithError(f"unexpected arguments: {' '.join(rest)}")


def main() -> None:
    try:
        sys.exit(run(sys.argv[1:]))
    except TunesmithError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
