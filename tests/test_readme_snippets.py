"""Every code block of README.md runs as copied (issue #30): a reader who pastes a snippet gets what
the README says, not a NameError, a wrong keyword or a 27 s wait for a Hub that is not there.

How the blocks run:

- The Python blocks under one heading run in README order as one script file (this environment's
  python, in a subprocess, in a fresh working directory), so a block may use the names and files
  an earlier block of the *same* section made; a block never relies on another section. Each block
  sits at its own README line in that file (a traceback's line number is README.md's), and a script,
  unlike a notebook, shows what breaks when worker processes import it again.
- A command-line block (a ``bash``/``sh`` fence or an indented block whose every command starts
  with ``xstars ``) runs through bash on its own, in a fresh working directory.
- The working directory holds the files the snippets open (``scene.tif``, ``s2.tif``,
  ``aerial.tif``, ``catalog.json``...), made from the bundled samples (tests/readme_fixtures.py).
- Every Hub repo a block names (``from_pretrained("org/name")``, ``hf-hub:org/name``, an ``xstars``
  command's model argument) is in a Hugging Face cache in a temporary ``HF_HOME`` holding the
  bundled model ``xstars-s2-aerial``, laid out as the client leaves a download; ``HF_HUB_OFFLINE=1``
  and an endpoint that refuses connections, so the real client reads the cache and nothing else.
- ``https://example.com/...`` is served by a loopback HTTP server with range requests
  (tests/range_server.py) from a folder holding the files the URLs name.
- What cannot run as written is changed by SUBSTITUTIONS (exact strings, each asserted to occur in
  its section's blocks, so an edit of the README cannot silently bypass them) or left out by
  EXCLUDED (with the reason); a block that is neither run nor excluded fails
  ``test_every_block_is_run_or_excluded``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from range_server import RangeServer
from readme_fixtures import INDENTED, Block, hub_cache, readme_blocks, workspace

from xstars_models import get_model_entry

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
LOOPBACK = "{base_url}"  # replaced by the loopback server's http://127.0.0.1:PORT

# (section, exact text in a block of that section, what runs instead, why).
SUBSTITUTIONS: list[tuple[str, str, str, str]] = [
    ("Training: from scratch and continual pretraining (MSAD)", "steps=2000", "steps=2",
     "2000 training steps take about an hour on 2 cores; 2 steps run the same code"),
    ("Whole scenes", "https://example.com", LOOPBACK, "a public URL: the loopback server serves the same paths"),
    ("Whole scenes", "window=(0, 0, 1024, 1024)", "window=(0, 0, 256, 256)",
     "the bundled sample scene behind the STAC Item is 256 x 256 px"),
    ("Whole collections (Dask)", "https://example.com", LOOPBACK, "a public URL: the loopback server serves it"),
    ("Whole collections (Dask)", " [--scheduler tcp://host:8786] [--bounds WEST SOUTH EAST NORTH]", "",
     "optional flags in synopsis brackets; a scheduler address needs a running Dask cluster"),
]

# (section, text that picks out one block of that section): why it does not run.
EXCLUDED: dict[tuple[str, str], str] = {
    ("Quick start", "make demo"): "make demo / make test create .venv and pip-install the package (PyPI); "
    "make test is this suite, make demo is run by tests/test_demo.py",
    ("Whole collections (Dask)", "--stac-api https://earth-search.aws.element84.com/v1"):
    "a search of a public STAC API; tests/test_archive_stac_api.py runs these flags against a loopback STAC API",
    ("Command line", "xstars list | info ID"): "the synopsis of every command (ID, FILES..., alternatives), not a command line",
    ("Citation", "@article{marsocci2025xstars"): "BibTeX, not code",
}

# (section, text that picks out one block): files the block says it writes; they must exist in
# its working directory once it ran.
OUTPUTS: dict[tuple[str, str], list[str]] = {
    ("Training: from scratch and continual pretraining (MSAD)", 'adapted.save_pretrained("my-model")'):
    ["my-model/config.json", "runs/aerial/metrics.jsonl"],
    ("Whole scenes", 'out="scene.map.tif"'): ["scene.map.tif"],
    ("Whole scenes", 'out="aoi.map.tif"'): ["aoi.map.tif", "tiles.parquet"],
    ("Whole collections (Dask)", "model.embed_collection("): ["s2_tiles/_manifest.json"],
    ("Whole collections (Dask)", "catalog.json a.tif https://example.com/b.tif"): ["s2_tiles/_manifest.json"],
    ("Search across sensors", 'result.write("hits.geojson")'): ["hits.geojson", "tiles/_index"],
    ("Search across sensors", "--out hits.parquet"): ["hits.parquet", "tiles/_index"],
    ("Export to ONNX (run without PyTorch: QGIS plugins, ONNX Runtime)", "model.export_onnx("):
    ["s2_cls.onnx", "s2_cls_int8.onnx", "s2_cls_uint8.onnx"],
    ("Export to ONNX (run without PyTorch: QGIS plugins, ONNX Runtime)", "xstars export"): ["s2_map.onnx"],
}

SHELL = {"bash", "sh", "shell", "console", INDENTED}
PYTHON = {"python", "py"}
TIMEOUT_S = 300  # per section or command block; a Hub wait like the would show up as a failure


def _commands(block: Block) -> list[str]:
    """The command lines of a shell block, continuation lines joined."""
    return [c.strip() for c in block.code.replace("\\\n", " ").splitlines() if c.strip() and not c.strip().startswith("#")]


def _reason(table: dict[tuple[str, str], Any], block: Block) -> Any:
    """What ``table`` (EXCLUDED, OUTPUTS) says of ``block``; ``None`` if not listed."""
    return next((why for (section, marker), why in table.items() if block.section == section and marker in block.code), None)


def _excluded(block: Block) -> str | None:
    return _reason(EXCLUDED, block)


def _runnable(block: Block) -> bool:
    if _excluded(block) is not None:
        return False
    if block.lang in PYTHON:
        return True
    return block.lang in SHELL and all(c.startswith("xstars ") for c in _commands(block))


def _substituted(block: Block, base_url: str) -> Block:
    code = block.code
    for section, old, new, _ in SUBSTITUTIONS:
        if section == block.section:
            code = code.replace(old, new.replace(LOOPBACK, base_url))
    return replace(block, code=code)


RUN = [b for b in BLOCKS if _runnable(b)]



# The Hub repos the blocks name (org/name, optionally @revision).
_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
_HUB_NAMES = re.compile(rf"""from_pretrained\(\s*["'](?P<a>{_REPO})(?:@[^"']*)?["']|hf-hub:(?P<b>{_REPO})|"""
                        rf"""^xstars +\w[\w-]* +(?P<c>{_REPO})(?:@\S*)?(?= |$)""", re.M)


def hub_repos(blocks: list[Block]) -> set[str]:
    return {m["a"] or m["b"] or m["c"] for b in blocks for m in _HUB_NAMES.finditer(b.code)}


def test_every_block_is_run_or_excluded():
    neither = [f"README.md line {b.line} ({b.lang or 'no language'}): {b.label}"
               for b in BLOCKS if not _runnable(b) and _excluded(b) is None]
    assert not neither, ("README code blocks that are neither run nor listed in EXCLUDED (with a reason) in "
                         f"tests/test_readme_snippets.py: {neither}")
    for section, marker in EXCLUDED:
        matches = [b for b in BLOCKS if b.section == section and marker in b.code]
        assert len(matches) == 1, f"EXCLUDED entry {(section, marker)!r} matches {len(matches)} README blocks, not 1"
    # Sanity: the README's first Use snippet, the one issue #30 reports, is among those run.
    assert any(b.section == "Use" and "XStars.from_pretrained(" in b.code for b in RUN)


def test_substitutions_occur_in_the_readme():
    for section, old, new, _ in SUBSTITUTIONS:
        blocks = [b for b in RUN if b.section == section]
        assert any(old in b.code for b in blocks), (
            f"SUBSTITUTIONS: {old!r} no longer occurs in a run block under the README heading {section!r}; "
            "update or remove the substitution")
        assert old != new and "\n" not in old + new  # a block keeps its README line numbers
    for section, marker in OUTPUTS:
        assert sum(b.section == section and marker in b.code for b in RUN) == 1, (
            f"{(section, marker)!r} (OUTPUTS) does not pick out one run README block")


def test_hub_repos_named_by_the_blocks_are_found():
    # The cache below is made for these names; finding none would leave the Hub path untested.
    assert {"org/name"} <= hub_repos(RUN)


@dataclass
class Sandbox:
    template: Path  # the working directory every run starts from a copy of
    env: dict[str, str]
    base_url: str
    runs: dict[str, tuple[Path, subprocess.CompletedProcess]]

    def fresh_dir(self, name: str) -> Path:
        folder = self.template.parent / "runs" / re.sub(r"\W+", "_", name)
        shutil.copytree(self.template, folder)
        return folder

    def run_section(self, section: str) -> tuple[Path, subprocess.CompletedProcess]:
        """Run the section's Python blocks in order as one script, once; later calls return the
        same result. After each block the script prints ``README-BLOCK-DONE <line>``."""
        if section not in self.runs:
            folder = self.fresh_dir(section)
            blocks = [_substituted(b, self.base_url) for b in RUN if b.section == section and b.lang in PYTHON]
            lines: list[str] = []
            for block in blocks:
                code = block.code.splitlines()
                lines += [""] * (block.line - 1 - len(lines)) + code
                # On the closing fence's line; a worker process importing the script prints nothing.
                lines.append(f'if __name__ == "__main__": print("README-BLOCK-DONE", {block.line}, flush=True)')
            script = folder / "readme_section.py"
            script.write_text("\n".join(lines) + "\n")
            result = subprocess.run([sys.executable, script.name], cwd=folder, env=self.env,
                                    capture_output=True, text=True, timeout=TIMEOUT_S)
            self.runs[section] = (folder, result)
        return self.runs[section]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Sandbox:
    root = tmp_path_factory.mktemp("readme")
    www = root / "www"
    www.mkdir()
    server = RangeServer(www)
    base_url = server.start()
    template = root / "template"
    template.mkdir()
    workspace(template, www, base_url)
    hf_home = root / "hf_home"
    hub_cache(hf_home / "hub", hub_repos(RUN), get_model_entry("xstars-s2-aerial").bundled_path)
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update({
        "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1",
        # Refused at once: were the client to ask the network after all, the block fails fast.
        "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MPLBACKEND": "Agg",
    })
    yield Sandbox(template, env, base_url, {})
    server.stop()


def _tail(result: subprocess.CompletedProcess, chars: int = 6000) -> str:
    return (result.stdout + result.stderr)[-chars:]


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.label)
def test_readme_block_runs(block: Block, sandbox: Sandbox):
    where = f"README.md line {block.line} ({block.label})"
    if block.lang in PYTHON:
        folder, result = sandbox.run_section(block.section)
        done = {int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("README-BLOCK-DONE ")}
        if block.line not in done:
            earlier = [b.line for b in RUN if b.section == block.section and b.lang in PYTHON and b.line < block.line]
            failed = next((line for line in earlier if line not in done), None)
            reason = f"not reached: the block at README.md line {failed} failed" if failed else "failed"
            pytest.fail(f"{where} {reason} (exit status {result.returncode}; readme_section.py's line numbers "
                        f"are README.md's):\n{_tail(result)}")
    else:
        code = _substituted(block, sandbox.base_url).code
        folder = sandbox.fresh_dir(f"shell-{block.line}")
        result = subprocess.run(["bash", "-e", "-c", code], cwd=folder, env=sandbox.env,
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        assert result.returncode == 0, f"{where} exited {result.returncode}:\n{_tail(result)}"
    missing = [name for name in _reason(OUTPUTS, block) or [] if not (folder / name).exists()]
    assert not missing, f"{where} ran but did not write {missing}"
