"""Gather the sections that the benchmark scripts wrote into ``benchmarks/RESULTS.md``.

Each ``bench_*.py`` script writes its own section to ``benchmarks/results/<name>.md`` (machine,
command, date and numbers of that run); this script only concatenates them, in a fixed order.

Usage: ``python benchmarks/make_results.py``
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["pooler", "selection", "pruner", "pruner_runtimes", "etl_table", "etl_full", "etl_full_heldout_head", "etl_full_lars", "gamma_tradeoff", "yaw_filters", "task_relationships"]


def main():
    sections = sorted((HERE / "results").glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    header = (
        "# Benchmark results\n\n"
        "Every section below was written by the script it names, with the machine, the exact command and the "
        "date of its run. Regenerate a section by running its script, then this file with "
        "`python benchmarks/make_results.py`.\n"
    )
    text = header + "".join("\n" + p.read_text().strip() + "\n" for p in sections)
    (HERE / "RESULTS.md").write_text(text)
    print(f"wrote {HERE / 'RESULTS.md'} from {len(sections)} sections")


if __name__ == "__main__":
    main()
