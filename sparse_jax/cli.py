"""The ``sparse-jax`` command line.

Subcommands:
  generate  greedy answer from a model to one prompt
  run       one experiment from gin files: prepare, predict, evaluate
  sweep     a grid of experiments from a sweep gin file
  report    tables and plots of a results folder
  analyze   statistics, cost model, Pareto frontier, scaling fits and the paper's claims of a results folder
  screen    which (model, task, length) cells dense attention scores clearly above chance on
  demo      the README's main job: the demo sweep on the embedded model, then its report
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

DEMO_SWEEP = Path(__file__).resolve().parent.parent / "configs" / "sweeps" / "demo.gin"


def _cmd_generate(args: argparse.Namespace) -> int:
    from sparse_jax.pipeline.generate_one import generate_answer

    text = generate_answer(
        args.prompt,
        model=args.model,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
    )
    print(text)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from sparse_jax.pipeline.experiment import parse_gin, current_config
    from sparse_jax.pipeline.runner import run_experiment

    parse_gin(args.gin_file, args.gin_param)
    config = current_config()
    run = run_experiment(config, stages=[s.strip() for s in args.stages.split(",") if s.strip()])
    print(f"results: {config.run_dir()}")
    if run is not None:
        from sparse_jax.pipeline.report import print_summary, run_row

        print_summary([run_row(run, config.run_dir())])
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from sparse_jax.pipeline.runner import run_sweep

    return run_sweep(args.sweep_file, args.gin_param, dry_run=args.dry_run, shard_spec=args.shard)


def _cmd_report(args: argparse.Namespace) -> int:
    from sparse_jax.pipeline.report import write_report

    write_report(Path(args.results_dir), out_dir=Path(args.out) if args.out else None, sweep_file=args.sweep)
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from sparse_jax.analysis import main_analyze

    results = Path(args.results_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"results folder {results} does not exist; run `sparse-jax run` or `sweep` first")
    if args.screen is not None and not Path(args.screen).is_file():
        raise FileNotFoundError(f"screen file {args.screen} does not exist; write it with `sparse-jax screen`")
    report = main_analyze(results, Path(args.out) if args.out else results / "analysis", screen_file=args.screen)
    print(f"analysis: {report}")
    return 0


def _cmd_screen(args: argparse.Namespace) -> int:
    from sparse_jax.analysis.screen import ScreenConfig, write_screen

    from sparse_jax.pipeline.errors import ConfigError

    results = Path(args.results_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"results folder {results} does not exist; run the screen sweep first")
    if args.margin is not None and args.margin < 0:
        raise ConfigError(f"--margin must be >= 0 (score units above chance), got {args.margin}")
    config = ScreenConfig() if args.margin is None else ScreenConfig(margin=args.margin)
    out = Path(args.out) if args.out else results / "screen"
    path, table = write_screen(results, out, config)
    print(table)
    print(f"screen: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sparse_jax.pipeline.report import write_report
    from sparse_jax.pipeline.runner import run_sweep

    results = Path(args.results_dir)
    bindings = [*args.gin_param, f"ExperimentConfig.results_dir = {str(results)!r}"]
    code = run_sweep(DEMO_SWEEP, bindings, dry_run=False, shard_spec="0/1")
    write_report(results, out_dir=results / "report", sweep_file=DEMO_SWEEP)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of a user error too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="greedy answer from a model to one prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a Hugging Face checkpoint folder")
    p.add_argument("--method", default="dense", help="attention method name")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("run", help="one experiment from gin files")
    p.add_argument("--gin_file", action="append", default=[], required=True)
    p.add_argument("--gin_param", action="append", default=[])
    p.add_argument("--stages", default="prepare,predict,evaluate", help="comma-separated subset, run in this order")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("sweep", help="a grid of experiments from a sweep gin file")
    p.add_argument("sweep_file")
    p.add_argument("--gin_param", action="append", default=[])
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.add_argument("--shard", default=None, help="i/n: run only this worker's share (default: JAX process index/count)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("report", help="tables (CSV, markdown) and plots of a results folder")
    p.add_argument("results_dir")
    p.add_argument("--out", default=None, help="output folder (default RESULTS_DIR/report)")
    p.add_argument("--sweep", default=None, help="sweep gin file: mark its runs that have no results yet")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("analyze", help="accuracy-preservation tests, cost model, Pareto and scaling fits")
    p.add_argument("results_dir")
    p.add_argument("--out", default=None)
    p.add_argument("--screen", default=None, help="screen.json of `sparse-jax screen`: analyse only the cells that passed")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("screen", help="dense score vs chance per model, task and length (the findings study's first step)")
    p.add_argument("results_dir")
    p.add_argument("--out", default=None, help="output folder (default RESULTS_DIR/screen)")
    p.add_argument("--margin", type=float, default=None,
                   help="how far above chance the lower bound must be (default: ScreenConfig.margin, 0.10)")
    p.set_defaults(func=_cmd_screen)

    p = sub.add_parser("demo", help="the README main job on the embedded SmolLM2")
    p.add_argument("--gin_param", action="append", default=[])
    p.add_argument("--results_dir", default="experiments/runs")
    p.set_defaults(func=_cmd_demo)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the input (settings, files, checkpoints, results folders), not by a bug."""
    from sparse_jax.analysis.records import RunFileError
    from sparse_jax.checkpoints.gguf import GGUFError
    from sparse_jax.checkpoints.hf import CheckpointError
    from sparse_jax.distributed.mesh import MeshError
    from sparse_jax.models.config import ConfigError as ModelConfigError
    from sparse_jax.engine.memory import InsufficientMemoryError
    from sparse_jax.pipeline.errors import ConfigError, IncompatibleResultsError, StageError
    from sparse_jax.pipeline.jsonl_store import CorruptResultsError

    return (
        ConfigError,
        FileNotFoundError,
        IncompatibleResultsError,
        CorruptResultsError,
        StageError,
        MeshError,
        InsufficientMemoryError,
        CheckpointError,
        GGUFError,
        ModelConfigError,
        RunFileError,
    )


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. User errors print one ``sparse-jax: ...`` line and return 2; bugs raise.

    With ``--debug`` the traceback of a user error is printed before that line. ``sweep`` and
    ``demo`` return 1 when some of their runs failed (:func:`sparse_jax.pipeline.runner.run_sweep`).
    """
    args = build_parser().parse_args(argv)
    # The engine reports each batch's memory plan (KV cache, activations, free memory) before it runs.
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("sparse_jax.engine").setLevel(logging.INFO)
    logging.getLogger("sparse_jax.models").setLevel(logging.INFO)  # the RoPE a run uses
    if args.command in ("run", "sweep", "demo"):
        # Multi-host launches (TPU pod slices, SLURM, mpirun, JAX_COORDINATOR_ADDRESS) must
        # initialise jax.distributed before any device is touched; a no-op on one host.
        from sparse_jax.distributed.runtime import initialize_from_env

        initialize_from_env()
    try:
        return args.func(args)
    except _user_errors() as e:
        from sparse_jax.pipeline.errors import error_line

        if args.debug:
            traceback.print_exc()
        print(f"sparse-jax: {error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
