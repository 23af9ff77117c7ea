"""MkDocs hook: benchmark results rendered into the pages at build time, from the JSON the harness wrote.

A page writes a marker where a table goes:

    <!-- results: benchmarks/results/small-cpu/results.json -->
    <!-- results: benchmarks/results/small-cpu/results.json seq_len=2048 -->
    <!-- results: benchmarks/results/small-cpu/results.json table=validation -->
    <!-- results: benchmarks/results/quantization_memory.json table=parameters -->

and the build replaces it with the table the harness's own report code makes from that file (`benchmarks/report.py`,
`benchmarks/validate.py`, `benchmarks/quantization_memory.py`), so the numbers on the site are the numbers in the
results files. Paths are relative to the repository root. `key=value` options other than `table` keep only the runs
whose field `key` equals `value` (`seq_len=2048`, `batch_size=1`). A `results.png` next to a `python -m benchmarks`
results file is copied into the site and shown under its table. A marker naming a missing file or an unknown table
fails the build.
"""

from __future__ import annotations

import copy
import importlib
import json
import pathlib
import posixpath
import re
import sys

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
SITE_FOLDER = "_results"  # where the plots land in the site
MARKER = re.compile(r"<!--\s*results:\s*(?P<path>\S+\.json)(?P<options>(?:\s+\w+=\S+)*)\s*-->")


def _harness(name: str):
    """`benchmarks.<name>` from this checkout (the harness is not installed with the package)."""
    package = sys.modules.get("benchmarks")
    if package is not None and pathlib.Path(package.__file__).resolve().parent != ROOT / "benchmarks":
        for module in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
            del sys.modules[module]  # another checkout's harness, imported through an editable install
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(f"benchmarks.{name}")
    finally:
        sys.path.remove(str(ROOT))


def _options(text: str) -> dict:
    return dict(option.split("=", 1) for option in text.split())


def _keep_runs(results: dict, filters: dict) -> dict:
    """A copy of `results` with only the runs whose fields equal every filter value."""
    results = copy.deepcopy(results)
    for record in results["methods"]:
        record["runs"] = [
            run for run in record.get("runs", []) if all(str(run.get(k)) == v for k, v in filters.items())
        ]
    return results


def _plot_uri(json_path: pathlib.Path) -> str | None:
    png = json_path.with_name("results.png")
    return f"{SITE_FOLDER}/{png.relative_to(RESULTS).as_posix()}" if png.is_file() else None


def render(path: str, options: dict, page_uri: str = "index.md") -> str:
    """The markdown that replaces one marker (`page_uri`: the page's path in docs/, for the plot's relative link)."""
    json_path = ROOT / path
    if not json_path.is_file():
        raise PluginError(f"results marker in {page_uri} names {path}, which does not exist")
    results = json.loads(json_path.read_text())
    table = options.pop("table", "runs" if "methods" in results else "training")
    if table == "runs":
        text = _harness("report").markdown_table(_keep_runs(results, options))
        plot = _plot_uri(json_path)
        if plot:
            link = posixpath.relpath(plot, posixpath.dirname(page_uri) or ".")
            text += f"\n\n![peak memory and step time against sequence length]({link})"
        return text
    if table == "validation":
        validate = _harness("validate")
        return validate.validation_table(validate.validate(str(json_path)))
    if table in ("parameters", "training"):
        harness = _harness("quantization_memory")
        return (harness.training_table if table == "training" else harness.parameter_table)(results)
    raise PluginError(
        f"results marker in {page_uri}: unknown table={table!r}; use runs, validation, parameters or training"
    )


def on_files(files, config):
    """Copy every benchmark plot into the site, under _results/."""
    for png in sorted(RESULTS.rglob("*.png")):
        files.append(File.generated(config, f"{SITE_FOLDER}/{png.relative_to(RESULTS).as_posix()}", abs_src_path=png))
    return files


def on_page_markdown(markdown, page, config, files):
    def replace(match):
        return render(match["path"], _options(match["options"]), page.file.src_uri)

    return MARKER.sub(replace, markdown)


def on_serve(server, config, builder):
    """`mkdocs serve` rebuilds when a results file changes."""
    server.watch(str(RESULTS))
    return server
