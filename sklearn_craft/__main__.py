"""Command line: ``python -m sklearn_craft demo [options]``."""

import argparse
import sys

from .demo import DEFAULT_TASKS


def _name_path(text):
    """Parse ``NAME=PATH``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def build_parser():
    """The argument parser of ``python -m sklearn_craft``."""
    parser = argparse.ArgumentParser(
        prog="python -m sklearn_craft",
        description="Cross-task aware filters (CRAFT / ETL): transfer and prune face networks.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run the CRAFT method end to end (default: synthetic faces, no download)",
        description=(
            "Run the CRAFT method end to end and write figures and a report. Without --data/--model it "
            "generates synthetic labelled faces, trains a small VGG-16 for identity on them (the primary "
            "task) and transfers it to age: satellite scores per layer, characteristic curves, "
            "CraftPruner at several gamma with fine-tuning, and score / parameters / FLOPs / CPU latency "
            "against the unpruned baseline. With --data and --model it does the same on a real face set "
            "and a real pretrained network."
        ),
    )
    demo.add_argument("--out", default="craft_demo_output", help="folder for figures and report.csv")
    demo.add_argument("--quick", action="store_true", help="a reduced run of well under a minute")
    demo.add_argument(
        "--data",
        type=_name_path,
        metavar="NAME=PATH",
        help=f"a real face set: NAME one of {', '.join(sorted(DEFAULT_TASKS))} (needs --model)",
    )
    demo.add_argument(
        "--model",
        type=_name_path,
        metavar="NAME=PATH",
        help="a real pretrained network: mobilefacenet, mtcnn_onet or mini_xception and its weights file",
    )
    demo.add_argument(
        "--task",
        help="label column to transfer to (default per data set: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_TASKS.items())
        + ")",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv=None):
    """Entry point of ``python -m sklearn_craft``."""
    args = build_parser().parse_args(argv)
    from .demo import run_demo

    try:
        run_demo(
            args.out,
            quick=args.quick,
            data=args.data,
            model=args.model,
            task=args.task,
            random_state=args.seed,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
