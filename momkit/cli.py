"""The ``momkit`` command (also ``python -m momkit``).

    momkit train CONFIG [key=value ...] [--resume | --overwrite]
    torchrun --nproc_per_node N -m momkit train CONFIG ...   (data-parallel on N processes; docs/training.md)
    momkit eval RUN_DIR [--checkpoint last|best] [--batch-size N]
    momkit generate RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--seed S]
                    [--cuda-graph]
    momkit info
    momkit sweep SPEC [--storage URL] [--study NAME] [--n-trials N] [--workers N] [--gpus IDS]
                 [--workers-per-gpu K] [--mps] [--timeout S] [--retry-failed] [--parallel-seeds]
    momkit sweep-report STUDY [--storage URL] [--out DIR]
    momkit convert SRC DST     (an fla / Hugging Face MoM model folder <-> a momkit run directory)

Bad input (unknown keys, wrong types, invalid values, missing files, an existing run directory)
prints one line naming the problem and exits with status 2, before anything is written.
Under torchrun every message names its rank, and a rank that fails exits (status 1 or 2), upon which
torchrun stops the other ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from momkit.config import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2 (argparse's own convention)
        self.exit(2, f"momkit: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from momkit.config import config_names

    p = _Parser(prog="momkit", description="A research kit for Mixture-of-Memories linear sequence models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a model from a config",
                       description="Train from a packaged config name or a YAML path, with dotted overrides "
                                   "(before or after the options), e.g. `momkit train mqar_tiny "
                                   "model.mom.num_memories=8`. Packaged configs: " + ", ".join(config_names())
                                   + ". See docs/training.md.")
    # optional here so that a missing config gets its own message (cmd_train)
    t.add_argument("config", nargs="?", default=None, help="packaged config name or YAML path (required)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    group = t.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in its run directory")
    group.add_argument("--overwrite", action="store_true", help="delete an existing run directory and start over")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser("eval", help="evaluate a trained run on its valid split",
                       description="Evaluate the checkpoint of RUN_DIR on its task's valid split; prints JSON.")
    e.add_argument("run_dir")
    e.add_argument("--checkpoint", default="last", choices=["last", "best"])
    e.add_argument("--batch-size", type=int, default=None)
    g = sub.add_parser("generate", help="generate text with a trained text language model",
                       description="Continue PROMPT with the checkpoint of RUN_DIR (a run of the byte-level text "
                                   "task), printing the prompt and its continuation. See docs/inference.md.")
    g.add_argument("run_dir")
    g.add_argument("--prompt", required=True, help="the text to continue (non-empty)")
    g.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens (bytes) to generate")
    g.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0: greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--checkpoint", default="last", choices=["last", "best"])
    g.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated (no progress bar)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--cuda-graph", action="store_true",
                   help="decode through one captured CUDA graph (CUDA; models without attention layers)")
    sub.add_parser("info", help="versions, device and which kernels run",
                   description="Print library versions, the device and which update-rule paths run here.")
    _sweep_parsers(sub)
    _add_convert(sub)
    return p


def _sweep_parsers(sub) -> None:
    from momkit.sweep.storage import DEFAULT_STORAGE

    storage_help = (f"Optuna storage: a SQLAlchemy URL (default {DEFAULT_STORAGE}; postgresql://user@host/db for "
                    "workers on many machines) or journal:PATH")
    s = sub.add_parser("sweep", help="run an Optuna sweep from a spec (sweeps/*.yaml)",
                       description="Run the sweep SPEC: create or resume its study in the storage and run workers "
                                   "until its queued trials are done. Every machine may run the same command "
                                   "against the same storage. See docs/sweeps.md.")
    s.add_argument("spec", help="sweep spec (YAML), e.g. sweeps/demo.yaml")
    s.add_argument("--storage", default=DEFAULT_STORAGE, metavar="URL", help=storage_help)
    s.add_argument("--study", default=None, metavar="NAME",
                   help="study name (default: the spec's study, else its file name)")
    s.add_argument("--n-trials", type=int, default=None, metavar="N",
                   help="the study's trial budget (default: the spec's budget.trials, or the whole grid)")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes on this machine (default: one per GPU of --gpus where GPUs exist, else 1)")
    s.add_argument("--gpus", default=None, metavar="IDS",
                   help="GPUs for the workers, e.g. 0,1,3 (ids as in nvidia-smi; default: every visible GPU)")
    s.add_argument("--workers-per-gpu", type=int, default=None, metavar="K",
                   help="workers on each GPU, for small models (default 1, or as many as --workers needs)")
    s.add_argument("--mps", action="store_true",
                   help="run the GPU workers under CUDA's Multi-Process Service (several small-model workers on one "
                        "GPU then run their kernels side by side)")
    s.add_argument("--retry-failed", action="store_true",
                   help="first queue again every failed trial that no retry replaces (after fixing what failed "
                        "them; the seeds they finished are kept)")
    s.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds after which a worker starts no new trial or seed (a trial with seeds left is "
                        "queued again)")
    s.add_argument("--parallel-seeds", action="store_true",
                   help="each worker trains a trial's seeds side by side, one process each on its device (small "
                        "models: a study with fewer trials left than a GPU has room for fills it; needs pruner: none)")
    s.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)  # a child of --workers
    s.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    r = sub.add_parser("sweep-report", help="export, plot and summarise a sweep's trials",
                       description="Export every trial of STUDY to CSV and Parquet, draw the figures, print the "
                                   "results table and write the best config as YAML.")
    r.add_argument("study")
    r.add_argument("--storage", default=DEFAULT_STORAGE, metavar="URL", help=storage_help)
    r.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <runs_dir>/<study>/report)")
    r.add_argument("--pool", nargs="+", default=None, metavar="STUDY",
                   help="judge the claims on the complete trials of these studies too (same storage, the same "
                        "experiment on other grids: a learning rate the study did not try counts for its side)")


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="convert a MoM model between fla / Hugging Face and momkit",
                       description="Convert a saved MoM model: an fla / Hugging Face folder (config.json, model_type "
                                   "mom) becomes a momkit run directory, a momkit run directory becomes an fla "
                                   "folder. Needs momkit[interop]; DST must not exist. docs/mom.md.")
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")


def cmd_convert(args) -> int:
    from momkit.interop import convert

    print(convert(args.src, args.dst))
    return 0


def _config_and_overrides(args) -> tuple[str, list[str]]:
    from momkit.config import config_names

    if args.config is None or "=" in args.config:
        got = "nothing" if args.config is None else repr(args.config)
        raise ConfigError(f"momkit train needs a config first, got {got}: a packaged config "
                          f"({', '.join(config_names())}) or a YAML path, e.g. momkit train mqar_tiny "
                          "model.mom.topk=1")
    return args.config, list(args.overrides)


def cmd_train(args) -> int:
    from momkit.config import load_config
    from momkit.train import train

    config, overrides = _config_and_overrides(args)
    cfg = load_config(config, overrides)
    if args.no_progress:
        cfg.run.progress = False
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if _rank() > 0:  # rank 0 reports the run
        return 0
    acc = result.final.get("valid/accuracy")
    print(f"run {result.run_dir}: {result.steps} steps ({result.stopped}), valid accuracy "
          f"{acc:.4f}" if acc is not None else f"run {result.run_dir}: {result.steps} steps ({result.stopped})")
    return 0


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    from momkit.train.distributed import launched_world_size

    return int(os.environ.get("RANK", "0")) if launched_world_size() > 1 else 0


def _who() -> str:
    """`` (rank r of n)`` under torchrun, else nothing: which process a message comes from."""
    from momkit.train.distributed import launched_world_size

    world = launched_world_size()
    return f" (rank {_rank()} of {world})" if world > 1 else ""


def _say(line: str) -> None:
    """One line on stderr in one write, so that the lines of several ranks do not interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def cmd_eval(args) -> int:
    import torch

    from momkit.train import evaluate, load_run

    cfg, model = load_run(args.run_dir, args.checkpoint)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} is invalid: must be a positive int")
    data = cfg.task_config().build()
    metrics = evaluate(model, data, args.batch_size or cfg.run.eval_batch_size or cfg.optim.batch_size,
                       torch.device("cpu"))
    print(json.dumps({"run_dir": args.run_dir, "checkpoint": args.checkpoint, **metrics}, indent=1))
    return 0


def cmd_generate(args) -> int:
    import codecs
    import time
    from pathlib import Path

    import torch
    from tqdm.auto import tqdm

    from momkit.config import load_config
    from momkit.tasks.text import ByteTokenizer
    from momkit.train import load_run

    if not (Path(args.run_dir) / "config.yaml").is_file():
        raise ConfigError(f"RUN_DIR={args.run_dir!r} is not a run directory (no config.yaml)")
    task = load_config(str(Path(args.run_dir) / "config.yaml"), validate_task=False).task.get("name")
    if task != "text":
        raise ConfigError(f"RUN_DIR={args.run_dir!r} was trained on task {task!r}: generate needs a text language "
                          "model (task text)")
    if not args.prompt:
        raise ConfigError("--prompt='' is invalid: must be non-empty text")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} is invalid: must be a positive int")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature={args.temperature} is invalid: must be >= 0 (0: greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k={args.top_k} is invalid: must be a positive int")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device='cuda' is invalid: no CUDA device is available (use cpu)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cuda_graph and device.type != "cuda":
        raise ConfigError(f"--cuda-graph needs a CUDA device; this run decodes on {device}")
    _, model = load_run(args.run_dir, args.checkpoint, validate_task=False)  # the training text is not needed
    model.to(device)
    if args.cuda_graph:
        from momkit.models.graphs import capture_refusal

        why = capture_refusal(model)
        if why is not None:
            raise ConfigError(f"--cuda-graph with RUN_DIR={args.run_dir!r} {why}")
    tok = ByteTokenizer()
    prompt = tok.encode(args.prompt)[None].to(device)
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    bar = tqdm(total=args.max_new_tokens, unit="tok", desc="generate", leave=False, file=sys.stderr,
               disable=args.no_progress or args.stream)

    def on_token(t) -> None:
        bar.update(1)
        if args.stream and int(t[0]) != tok.eos_id:
            sys.stdout.write(text.decode(bytes([int(t[0])])))
            sys.stdout.flush()

    if args.stream:
        sys.stdout.write(args.prompt)
    t0 = time.perf_counter()
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=torch.Generator(device).manual_seed(args.seed), on_token=on_token,
                         cuda_graph=args.cuda_graph)
    seconds = time.perf_counter() - t0
    bar.close()
    print(text.decode(b"", final=True) if args.stream else tok.decode(out[0].cpu()))
    print(f"momkit: {args.max_new_tokens} tokens in {seconds:.2f} s ({args.max_new_tokens / seconds:.1f} tokens/s, "
          f"prefill included) on {device}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    import momkit
    from momkit.rules import get_rule, rule_names

    lines = [f"momkit {momkit.__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
        x = torch.zeros(1, device="cuda")
    else:
        dev = f"cpu ({torch.get_num_threads()} threads)"
        x = torch.zeros(1)
    lines.append(f"device: {dev}")
    for name in rule_names():
        reason = get_rule(name).triton_unavailable_reason(x)
        path = "triton" if reason is None and x.is_cuda else "chunked (PyTorch)"
        lines.append(f"  {name:<16} impl=auto runs {path}" + (f"; triton: {reason}" if reason else ""))
    print("\n".join(lines))
    return 0


def _quiet_optuna() -> None:
    """The sweep commands print their own progress: Optuna's per-study info lines would interleave with it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def cmd_sweep(args) -> int:
    from momkit.sweep.runner import EXIT_DEVICE_LOST, DeviceLost, format_summary, run_sweep, run_worker
    from momkit.sweep.spec import check_study_name, load_spec
    from momkit.sweep.storage import check_url, describe

    spec = load_spec(args.spec)
    _quiet_optuna()
    check_url(args.storage)
    if args.worker_index is not None:  # one of the processes started by --workers
        study = check_study_name(args.study or spec.study, "--study")
        try:
            run_worker(spec, args.storage, study, timeout=args.timeout, threads=args.threads,
                       parallel_seeds=args.parallel_seeds)
        except DeviceLost as e:
            _say(f"momkit: worker stopped: {e}")
            return EXIT_DEVICE_LOST
        return 0
    try:
        summary = run_sweep(spec, args.storage, args.study, n_trials=args.n_trials, workers=args.workers,
                            gpus=args.gpus, workers_per_gpu=args.workers_per_gpu, timeout=args.timeout,
                            mps=args.mps, retry=args.retry_failed, parallel_seeds=args.parallel_seeds)
    except DeviceLost as e:  # the trials ran in this process: only a new one has a working GPU
        _say(f"momkit: sweep stopped: {e}; run the same command again to continue them")
        return 1
    print(format_summary(spec, summary))
    if summary.ran:
        print(f"this command ran trial{'s' if len(summary.ran) > 1 else ''} {', '.join(map(str, summary.ran))}")
    print(f"report: momkit sweep-report {summary.study} --storage {describe(args.storage)}")
    if summary.first_error is not None and not summary.counts.get("COMPLETE"):
        print(f"momkit: no trial of study {summary.study!r} completed ({summary.counts['FAIL']} failed); the first "
              f"failure: {summary.first_error} (once fixed, --retry-failed runs the failed trials again)",
              file=sys.stderr)
        return 1
    return 1 if summary.worker_errors else 0


def cmd_sweep_report(args) -> int:
    import matplotlib

    from momkit.sweep.report import write_report

    matplotlib.use("Agg")  # files only, no window
    _quiet_optuna()
    write_report(args.study, args.storage, args.out, pool=args.pool)
    return 0


def main(argv: list[str] | None = None) -> int:
    from momkit.runtime import tune_cpu
    from momkit.train.loop import NonFiniteError

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may follow the options (`momkit train cfg --resume run.progress=false`)
    if args.command == "train" and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides, extra = args.overrides + extra, []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    tune_cpu()  # before any tensor work: see momkit/runtime.py
    try:
        commands = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "info": cmd_info,
                    "sweep": cmd_sweep, "sweep-report": cmd_sweep_report, "convert": cmd_convert}
        return commands[args.command](args)
    except ConfigError as e:
        _say(f"momkit: error{_who()}: {e}")
        return 2
    except NonFiniteError as e:
        _say(f"momkit: training stopped{_who()}: {e}")
        return 1
    except KeyboardInterrupt as e:  # a TrainingInterrupted says where the run stopped and how to go on
        _say(f"momkit: interrupted{_who()}" + (f": {e}" if str(e) else ""))
        return 130
    except Exception as e:
        if not _who():
            raise
        # one rank failed: exit at once (torchrun then stops the others) rather than leave them waiting
        import traceback

        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _say(f"momkit: error{_who()}: {type(e).__name__}: {first}; the job stops")
        return 1


if __name__ == "__main__":
    sys.exit(main())
