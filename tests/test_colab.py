"""Each chapter's Colab cell, tried as on Colab: a fresh virtual environment that already has another torch
(Colab ships its own) and no myst-nb. The cell's install line must keep that torch, and the chapter's first
cells (imports, set-up) must then run. Slow (it builds a venv): `make test-colab` runs it, `make test` includes it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
CELL = re.compile(r'!pip install -q "flbook-helpers(?P<extras>\[[a-z,]+\])? @ '
                  r'git\+https://github\.com/flbook/fl-compression-book@v(?P<tag>[0-9.]+)"')
OTHER_TORCH = "torch==2.13.0"      # not the book's 2.14.1; on this machine pip takes the CPU wheel from its disk


def colab_cell(nb_path: Path) -> re.Match:
    cells = json.loads(nb_path.read_text())["cells"]
    first = "".join(cells[0]["source"])
    assert "remove-cell" in cells[0]["metadata"].get("tags", []), f"{nb_path.name}: the Colab cell is not hidden"
    match = CELL.search(first)
    assert match and 'if "google.colab" in sys.modules' in first, f"{nb_path.name}: unexpected Colab cell:\n{first}"
    return match


def first_cells(nb_path: Path) -> str:
    """The code cells after the Colab cell, up to the one that calls chapter_setup(), without IPython magics."""
    code = []
    for cell in json.loads(nb_path.read_text())["cells"][1:]:
        if cell["cell_type"] != "code":
            continue
        code += [line for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith(("%", "!"))]
        if "chapter_setup(" in "".join(cell["source"]):
            return "\n".join(code)
    raise AssertionError(f"{nb_path.name}: no set-up cell calls chapter_setup()")


def run(cmd: list[str], **kw) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_every_colab_cell_pins_the_release_tag_and_installs_only_its_extras():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for nb in CHAPTERS:
        m = colab_cell(nb)
        assert m["tag"] == version, f"{nb.name}: the Colab cell installs v{m['tag']}, the package is {version}"
        assert "requirements.txt" not in m.group(0)
        for extra in (m["extras"] or "[]")[1:-1].split(","):
            assert not extra or extra in extras, f"{nb.name}: unknown extra {extra!r}"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """What the git URL of the Colab cell would fetch: this checkout's package, copied (a build here would
    leave build/ in the working tree)."""
    src = tmp_path_factory.mktemp("package")
    shutil.copytree(ROOT / "helpers", src / "helpers", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


@pytest.fixture(scope="module")
def colab_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("colab") / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    run([py, "-m", "pip", "install", "-q", OTHER_TORCH])
    return py


def torch_version(py: str) -> str:
    return run([py, "-c", "import torch; print(torch.__version__)"]).strip()


@pytest.mark.parametrize("extras", ["", "[deploy]", "[flower]", "[privacy]"])
def test_a_chapter_opens_on_colab_with_colab_s_torch_and_no_myst_nb(colab_venv, package, extras):
    chapters = [nb for nb in CHAPTERS if (colab_cell(nb)["extras"] or "") == extras]
    assert chapters, f"no chapter installs flbook-helpers{extras}"
    before = torch_version(colab_venv)
    # the cell's own line, with the git URL replaced by this checkout's package
    run([colab_venv, "-m", "pip", "install", "-q", f"flbook-helpers{extras} @ {package.as_uri()}"])
    assert torch_version(colab_venv) == before, "the Colab cell replaced the preinstalled torch"
    run([colab_venv, "-c", "import importlib.util as u; assert u.find_spec('myst_nb') is None, 'myst_nb installed'"])
    env = dict(os.environ, MPLBACKEND="Agg", FLBOOK_WORKERS="1",
               FLBOOK_DATA=os.environ.get("FLBOOK_DATA", str(ROOT / "data")))
    for nb in chapters:
        code = first_cells(nb) + "\nprint('first cells ran')\n"
        out = run([colab_venv, "-c", code], cwd=ROOT / "book", env=env)
        assert "first cells ran" in out, nb.name
