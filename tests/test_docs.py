"""Every Python snippet in the README and the docs runs, so the docs cannot drift from the code.

The convention (also in docs/index.md, "Writing docs"):

* Every fenced block opened with ```python (or ```py) in README.md and docs/**/*.md is executed.
* The blocks of one page run in order in one fresh Python process and share one namespace, like notebook cells,
  with an empty temporary directory as the working directory, on CPU (CUDA_VISIBLE_DEVICES=""), with
  HF_HUB_OFFLINE=1. Snippets are self-contained: tiny models built from transformers configs, files written to
  relative paths.
* A block right after an HTML comment `<!-- skip: REASON -->` (only blank lines between them), e.g.
  `<!-- skip: needs a CUDA GPU -->` or `<!-- skip: needs the Hugging Face Hub -->`, is not run; it shows up as a
  skipped test `test_snippet_skipped[PAGE:LINE]` with REASON in `pytest -ra`. Later blocks of the page still run,
  so a skipped block must not define what they use.
* Blocks in other languages (```bash, ```text, ...) are not run.

A failing snippet's traceback names the page and its line number in the markdown file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
SKIP = re.compile(r"^\s*<!--\s*skip:\s*(?P<reason>.+?)\s*-->\s*$")
PAGE_TIMEOUT_S = 600


@dataclasses.dataclass
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the first code line
    code: str
    skip: str | None  # the reason, or None when the block runs


def python_blocks(path: pathlib.Path) -> list[Block]:
    """The ```python blocks of a markdown file, each with the skip reason of the comment right before it."""
    lines = path.read_text().splitlines()
    blocks, index, previous = [], 0, ""
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            if lines[index].strip():
                previous = lines[index]
            index += 1
            continue
        fence, language = opening["fence"], (opening["info"].split() or [""])[0].lower()
        end = index + 1
        while end < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence)}[`~]*[ \t]*$", lines[end]):
            end += 1
        if language in ("python", "py"):
            skip = SKIP.match(previous)
            code = textwrap.dedent("\n".join(lines[index + 1 : end]))
            page = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
            blocks.append(Block(page, index + 2, code, skip["reason"] if skip else None))
        previous, index = lines[index], end + 1
    return blocks


BLOCKS = {str(page.relative_to(ROOT)): python_blocks(page) for page in PAGES}
RUN = [page for page, blocks in BLOCKS.items() if any(block.skip is None for block in blocks)]
SKIPPED = [block for blocks in BLOCKS.values() for block in blocks if block.skip is not None]

# Runs in the page's process: each block compiled with its page and line, so tracebacks point into the markdown.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for page, line, code in json.load(sys.stdin):
    exec(compile("\\n" * (line - 1) + code, page, "exec"), namespace)
"""


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN)
def test_snippets_of_a_page_run_in_order(page, tmp_path):
    blocks = [(str(ROOT / block.page), block.line, block.code) for block in BLOCKS[page] if block.skip is None]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
    }
    result = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT_S,
    )
    assert result.returncode == 0, f"a snippet of {page} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.parametrize("block", SKIPPED, ids=[f"{block.page}:{block.line}" for block in SKIPPED])
def test_snippet_skipped(block):
    pytest.skip(f"{block.page}:{block.line} not run: {block.skip}")


def test_the_parser_finds_blocks_and_skip_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n```python\na = 1\n```\n\n<!-- skip: needs a CUDA GPU -->\n\n```python\nb = 2\n```\n\n"
        "```bash\nls\n```\n\n* item\n\n  ```py\n  c = a + 1\n  ```\n"
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (4, "a = 1", None),
        (10, "b = 2", "needs a CUDA GPU"),
        (20, "c = a + 1", None),
    ]


def _results_hook():
    spec = importlib.util.spec_from_file_location("docs_results_hook", ROOT / "docs" / "_hooks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_page_tables_are_rendered_from_the_results_files():
    hook = _results_hook()
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    rendered = hook.on_page_markdown(
        page, types.SimpleNamespace(file=types.SimpleNamespace(src_uri="benchmarks.md")), {}, None
    )
    assert not hook.MARKER.search(rendered)
    runs = json.loads((ROOT / "benchmarks" / "results" / "small-cpu" / "results.json").read_text())
    for record in runs["methods"]:
        for run in record["runs"]:
            row = f"| {record['method']} | {run['batch_size']} | {run['seq_len']} | {record['trainable_params']:,} | "
            assert f"{row}{run['peak_bytes'] / 2**20:.1f} |" in rendered
    assert "![peak memory and step time against sequence length](_results/small-cpu/results.png)" in rendered
    quantized = json.loads((ROOT / "benchmarks" / "results" / "quantization_memory.json").read_text())
    for record in quantized["training_step"]:
        peak = record["step2"]["peak_bytes"] / 2**20
        assert f"| {record['method']} | {record['trainable_params']:,} | {peak:,.1f} MiB |" in rendered
    for name, sizes in quantized["parameter_bytes"].items():
        assert f"| {name} | {sizes['decoder_linear_bytes'] / 2**20:,.1f} MiB |" in rendered


def test_a_results_marker_naming_a_missing_file_fails_the_build():
    hook = _results_hook()
    with pytest.raises(Exception, match="does not exist"):
        hook.render("benchmarks/results/nothing.json", {}, "page.md")
