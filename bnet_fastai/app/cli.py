"""The `bnet-fastai` command: run, sweep, study, report, data, check (the preflight) and archs.

Every `RunConfig` field is an option (``--label-smoothing`` for ``label_smoothing``); in `sweep` each
takes a comma-separated list. `sweep` and `study` train N runs at a time with ``--parallel N``, or on a Ray
cluster with ``--ray ADDRESS`` (`bnet_fastai.sweeps.executors`). Bad input exits 2 with one line naming the valid
choices or the fix, before anything is written. Arguments, ``--help``, ``--version``, ``archs`` and the checks
of every setting, of ``--out`` and of ``--parallel``/``--ray`` run without importing torch (`bnet_fastai.names`,
`bnet_fastai.runs.config`, `bnet_fastai.sweeps.executors`): a rejection is quick. The one exception is an arch
the project does not name, which may be any timm model: timm's registry decides (and a BNET run of it is tried on
the meta device, so that `swap_norm`'s refusals come before anything is written).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys

from bnet_fastai import __version__, names
from bnet_fastai._checks import check_choice, check_output_folder
from bnet_fastai.runs.config import FIELD_HELP, RunConfig, expand_grid
from bnet_fastai.runs.runstate import DONE, RunFailed, RunLocked

EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 2, 1, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: no usage block."""

    def error(self, message: str) -> None:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def true_or_false(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def accuracy(text: str) -> float:
    """--target: an accuracy in (0, 1] (argparse turns the error into one line, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be an accuracy in (0, 1], e.g. 0.8, got {text!r}")
    return value


def int_or_none(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


_TYPES = {"str": str, "int": int, "float": float, "bool": true_or_false, "int | None": int_or_none}


def _list_of(one):
    def convert(text: str) -> list:
        return [one(v) for v in text.split(",")]

    convert.__name__ = f"{one.__name__} list"  # argparse names it in "invalid ... value" errors
    return convert


def _add_config_options(parser: argparse.ArgumentParser, lists: bool) -> None:
    for f in dataclasses.fields(RunConfig):
        convert = _list_of(_TYPES[f.type]) if lists else _TYPES[f.type]
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=convert, default=None,
                            metavar=f.name.upper(), help=f"{FIELD_HELP[f.name]} (default: {f.default})"
                            + ("; comma-separated values make a grid axis" if lists else ""))


def _config_args(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if getattr(args, f.name) is not None}


def output_folder(args: argparse.Namespace, default: str = "default") -> str:
    """`--out`, or ``<results root>/<default>``: under `BNET_FASTAI_RESULTS` when that is set. Checked to be
    a folder this process can write (ValueError otherwise), without creating it."""
    from bnet_fastai.paths import results_root

    out = args.out if args.out is not None else str(results_root() / default)
    check_output_folder(out)
    return out


def _plain_download_bars() -> None:
    """Once the arguments are checked and a command will load torch: no console bars in a log file."""
    from bnet_fastai.runs.progress import plain_download_bars

    plain_download_bars()


def _run(args: argparse.Namespace) -> int:
    config = RunConfig(**_config_args(args))
    config.validate()  # before torch is imported: a bad setting is rejected at once
    out = output_folder(args)
    _plain_download_bars()
    from bnet_fastai.runs.train import run

    result = run(config, out, force=args.force)
    if result.get("damaged"):
        print(f"the earlier run was damaged ({result['damaged']}): trained again")
    how = " (reused)" if result.get("reused") else ""
    if result.get("resumed_from_epoch") and not result.get("reused"):
        how = f" (resumed from epoch {result['resumed_from_epoch']})"
    print(f"{result['status']}{how}: {result['run_dir']}")
    return 0  # finished or diverged: the run completed; its status says which


def runs_at_a_time(text: str) -> int:
    """--parallel: an integer >= 1 (argparse turns the error into one line, exit 2)."""
    from bnet_fastai.sweeps.executors import check_parallel

    try:
        return check_parallel(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (the number of runs trained at a time), "
                                         f"got {text!r}") from None


def _add_executor_options(parser: argparse.ArgumentParser) -> None:
    """--parallel and --ray: where a grid's runs train (`bnet_fastai.sweeps.executors`)."""
    parser.add_argument("--parallel", type=runs_at_a_time, default=1, metavar="N",
                        help="train N runs at a time on this machine, one GPU each where there are GPUs "
                        "(default: 1)")
    parser.add_argument("--ray", default=None, metavar="ADDRESS",
                        help="make each run a task on a Ray cluster: local (start one on this machine), auto, "
                        "ray://HOST:PORT or HOST:PORT; needs pip install 'bnet-fastai[ray]'")


def _executor_args(args: argparse.Namespace) -> dict:
    """`parallel` and `ray` for `sweep` and `study`, checked without torch (`bnet_fastai.sweeps.executors.check`)."""
    from bnet_fastai.sweeps import executors

    executors.check(args.parallel, args.ray)
    return {"parallel": args.parallel, "ray": args.ray}


def _sweep(args: argparse.Namespace) -> int:
    grid = _config_args(args)
    expand_grid(RunConfig(), grid)  # every run of the grid checked before torch is imported
    out = output_folder(args)
    where = _executor_args(args)
    _plain_download_bars()
    from bnet_fastai.sweeps.sweep import sweep

    results = sweep(RunConfig(), grid, out, force=args.force, **where)
    counts = {s: sum(r["status"] == s for r in results) for s in dict.fromkeys(r["status"] for r in results)}
    print(f"sweep done: {', '.join(f'{n} {s}' for s, n in counts.items())} in {out}")
    return 0 if all(r["status"] in DONE for r in results) else EXIT_RUN_FAILED


def _study(args: argparse.Namespace) -> int:
    check_choice("dataset", args.dataset, ("auto", *names.DATASETS))  # before torch is imported
    if args.out is not None:
        check_output_folder(args.out)
    where = _executor_args(args)
    _plain_download_bars()
    from bnet_fastai.analysis.answer import answer_lines
    from bnet_fastai.analysis.report import report
    from bnet_fastai.sweeps.study import resolve, run_study

    study = resolve(args.dataset, args.profile, archs=args.archs, norms=args.norms, seeds=args.seeds, k=args.k,
                    placement=args.placement, epochs=args.epochs)
    out = output_folder(args, f"{study.dataset}-{study.profile}")
    print(study.describe(), flush=True)
    results = run_study(study, out, **where)
    if not all(r["status"] in DONE for r in results):
        print(f"bnet-fastai study: {sum(r['status'] not in DONE for r in results)} run(s) did not finish; "
              f"run the same command again to resume them", file=sys.stderr)
        return EXIT_RUN_FAILED
    tables = report(out)
    for line in answer_lines(tables):
        print(line)
    reused = sum(bool(r.get("reused")) for r in results)
    counted = tables["history"]["run_id"].nunique()
    others = counted - len({r["run_dir"] for r in results if r["status"] == "finished"})
    print(f"study done: {len(results)} runs ({len(results) - reused} trained, {reused} reused); the report covers "
          f"{counted} finished run(s) in {out}" + (f", {others} of them from outside this study" if others > 0 else "")
          + (f", and leaves out {len(tables['skipped'])} (bnet-fastai report {out} names them)"
             if len(tables["skipped"]) else "") + "; summary.csv, paired.csv and plots there")
    return 0


def _left_out(row) -> str:
    """`<run_id>: failed: <error>` or `<run_id>: damaged: history.csv: ...`: why a run is not reported."""
    return f"{row.run_id}: {row.status}{': ' + row.reason if row.reason else ''}"


def _report(args: argparse.Namespace) -> int:
    check_output_folder(args.out or args.dirs[0])  # a read-only experiment folder: one line naming --out
    from bnet_fastai.analysis.answer import answer_lines
    from bnet_fastai.analysis.markdown import (answers_markdown, budget_markdown, by_dataset, pooled_note,
                                              results_markdown, short_answer_markdown)
    from bnet_fastai.analysis.report import NoFinishedRun, report

    try:
        tables = report(args.dirs, target=args.target, out=args.out,
                        cost=args.cost_ratio if args.cost_ratio is not None else args.cost)
    except NoFinishedRun as e:  # every run left out: say why, one line per run
        print(f"bnet-fastai report: error: no finished run in {', '.join(args.dirs)}"
              + ("" if len(e.skipped) else " (no run folder)"), file=sys.stderr)
        for row in e.skipped.itertuples():
            print(f"  {_left_out(row)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.markdown:  # a budget study: the README's answers (a)-(d), then docs/results.md's tables
        if "equal_cost" in tables:
            command = " ".join(["bnet-fastai report", *args.dirs, "--markdown"])
            parts = by_dataset(tables)  # each dataset's study answered on its own
            print("\n\n".join((f"## {dataset}\n\n" if len(parts) > 1 else "")
                              + f"{short_answer_markdown(part, command)}\n\n{answers_markdown(part, command)}\n\n"
                              f"{budget_markdown(part)}" for dataset, part in parts.items()))
        else:
            print(results_markdown(tables))
        return 0
    for row in tables["skipped"].itertuples():
        print(f"left out {_left_out(row)}")
    if pooled_note(tables["history"]):
        print(pooled_note(tables["history"]))
    for line in answer_lines(tables):  # the answer first, then the numbers behind it
        print(line)
    print("Per arm:")
    columns = ["dataset", "arch", "variant", "n_seeds", "final_accuracy_mean", "final_accuracy_ci_low",
               "final_accuracy_ci_high", "epochs_to_target_mean", "auc_mean", "valid_loss_spread"]
    print(tables["summary"][columns].to_string(index=False, float_format="%.4f"))
    print(f"intervals: {tables['summary']['ci_method'].iloc[0]}")
    if "equal_cost" in tables:
        print("budget study: epochs_to_match.csv, equal_cost.csv, break_even.csv and budget.png")
    print(f"wrote summary.csv, paired.csv and PNG plots in {args.out or args.dirs[0]}")
    return 0


def _data(args: argparse.Namespace) -> int:
    check_choice("dataset", args.dataset, names.DATASETS)  # before torch is imported
    _plain_download_bars()
    from bnet_fastai.data.datasets import prepare

    print(prepare(args.dataset))
    return 0


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def device_spec(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N, checked without torch (whether torch sees it is checked later)."""
    head, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected {DEVICE_FORMS}, got {text!r}")


def _check(args: argparse.Namespace) -> int:
    import time

    if args.out is not None:
        check_output_folder(args.out)
    _plain_download_bars()
    from bnet_fastai.app.preflight import MEASURED, preflight, resolve_device, write_json

    started = time.time()
    where = resolve_device(args.device)  # a GPU asked for and not seen: one line, exit 2
    print(f"bnet-fastai check: the training path on {where} ({MEASURED}; no GPU figure yet), one line per "
          f"check", flush=True)
    results = preflight(args.device, args.out, report=lambda line: print(line, flush=True))
    if args.json:
        write_json(results, args.json, args.device, time.time() - started)
    failed = [r.name for r in results if r.status == "fail"]
    passed = sum(r.status == "pass" for r in results)
    print(f"{passed} passed, {len(failed)} failed, {len(results) - passed - len(failed)} skipped in "
          f"{time.time() - started:.0f} s" + (f"; table in {args.json}" if args.json else ""))
    if failed:
        print(f"bnet-fastai check: failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def _archs(args: argparse.Namespace) -> int:
    print(f"archs: {', '.join(names.ARCHS)}; or any timm model name (its BatchNorms converted by swap_norm)")
    print("norms:", ", ".join(names.NORMS))
    print("datasets:", ", ".join(names.DATASETS))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bnet_fastai.paths import where_files_go

    parser = _Parser(prog="bnet-fastai", description="BatchNorm vs BNET experiments with fastai.",
                     epilog=f"Files here: {where_files_go()}.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, func, lists, text in (("run", _run, False, "train one configuration"),
                                    ("sweep", _sweep, True, "train a grid (comma lists); re-run to resume")):
        p = sub.add_parser(name, help=text, description=text)
        _add_config_options(p, lists)
        p.add_argument("--out", default=None, help="experiment folder, one sub-folder per run "
                       "(default: results/default, under $BNET_FASTAI_RESULTS when set)")
        p.add_argument("--force", action="store_true", help="retrain runs that already finished")
        if name == "sweep":
            _add_executor_options(p)
        p.set_defaults(func=func)
    p = sub.add_parser("study", help="run a study profile (the notebook's grid) and report it")
    p.add_argument("profile", choices=names.PROFILES, help="quick, cpu (the accuracy study at equal epochs), "
                   "convergence (the budget study behind the README's answers), budget (that study of your network "
                   "on Imagenette: --archs, GPU), full or leaderboard (Imagenette, GPU)")
    p.add_argument("--dataset", default="auto", help="default: the profile's dataset (never another one for the "
                   "GPU profiles), for quick the first available")
    # the notebook's parameters, parsed by the same code (`bnet_fastai.sweeps.study.resolve`); default: the profile's
    p.add_argument("--archs", default=None, help="comma-separated archs: the project's (`bnet-fastai archs`) or any "
                   "timm model name, e.g. resnet18,efficientnet_b0")
    p.add_argument("--norms", default=None, help="comma-separated: bn, bnet or BNET variants such as bnet-k5-last")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--k", default=None, help="BNET kernel size, or several comma-separated (a grid axis)")
    p.add_argument("--placement", default=None, help="all, last, or all,last")
    p.add_argument("--epochs", default=None, help="epochs, or several comma-separated (a budget study)")
    p.add_argument("--out", default=None, help="experiment folder (default: results/<dataset>-<profile>, "
                   "under $BNET_FASTAI_RESULTS when set)")
    _add_executor_options(p)
    p.set_defaults(func=_study)
    p = sub.add_parser("report", help="summary.csv and plots of one experiment folder, or of several combined")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="experiment folder(s): the --out of runs or sweeps")
    p.add_argument("--out", default=None, help="where to write when several folders are combined")
    p.add_argument("--markdown", action="store_true", help="print the tables as docs/results.md shows them (for a budget study, the "
                   "README's answers first)")
    p.add_argument("--target", type=accuracy, default=None,
                   help="accuracy for 'epochs to target', for every dataset (default: 90%% of each dataset's best "
                   "mean final accuracy)")
    p.add_argument("--cost", default=None, metavar="PATH", help="a budget study's BNET/BN step-time ratios: "
                   "the JSON of benchmarks/train_step.py --json (default: DIR/cost.json when it exists)")
    p.add_argument("--cost-ratio", type=float, default=None, metavar="R",
                   help="one BNET/BN step-time ratio for every BNET variant, instead of --cost")
    p.set_defaults(func=_report)
    p = sub.add_parser("data", help="download/prepare a dataset and print its path",
                       description=f"Download and prepare a dataset; {where_files_go()}.")
    p.add_argument("dataset")
    p.set_defaults(func=_data)
    p = sub.add_parser("check", help="preflight: train, resume, reload, fuse and time BN and BNET on this "
                       "machine, one line per check (run it first on a GPU you rent for a study)")
    p.add_argument("--device", type=device_spec, default="auto", help=f"{DEVICE_FORMS} (default: auto, the GPU "
                   "when torch sees one)")
    p.add_argument("--out", default=None, help="keep the check's runs, data and cache in this folder "
                   "(default: a temporary folder, removed)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON to PATH")
    p.set_defaults(func=_check)
    sub.add_parser("archs", help="list model, norm and dataset names").set_defaults(func=_archs)
    return parser


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # so the current run is marked `interrupted`


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return args.func(args)
    except RunLocked as e:  # another process trains this run: nothing is wrong with it, nothing was touched
        print(f"bnet-fastai {args.command}: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except RunFailed as e:  # training itself failed; status.json holds the details
        print(f"bnet-fastai {args.command}: failed: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except ValueError as e:  # bad input, raised where the value entered (DatasetError included)
        print(f"bnet-fastai {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `bnet-fastai report DIR | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        again = "; run the same command again to resume" if args.command in ("run", "sweep", "study") else ""
        print(f"bnet-fastai {args.command}: interrupted{again}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001  (a failed run: its status.json holds the details)
        print(f"bnet-fastai {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """End torch's default process group if this command started one (a run under ``torchrun`` or
    ``accelerate launch`` starts it in `share_decision`), before the interpreter shuts down: torch asks for
    it, and a gloo group left to the shutdown can abort a process whose run has finished ("terminate called
    without an active exception", exit -6), which the launcher reports as a failed run. Here, not in `run`:
    accelerate's state keeps the group for any later run in the same process; the command is the last."""
    torch = sys.modules.get("torch")  # a command that never imported torch started no group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
