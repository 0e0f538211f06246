"""What the benchmark scripts share that needs neither torch nor the model: writing the JSON report."""
import json
import os


def write_report(path: str, report: dict, indent: int = 2) -> None:
    """Write ``report`` as indented JSON to ``path`` through the temporary file ``path.tmp``, making its folder
    first, so that an interrupted run leaves the previous report in place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=indent)
    os.replace(tmp, path)


def finish(path: str, report: dict, table: str) -> int:
    """The end of a benchmark run: write ``report`` to ``path`` (``write_report``), print ``table`` and where the
    report went; returns the exit status 0."""
    write_report(path, report)
    print(table)
    print(f"wrote {path}")
    return 0
