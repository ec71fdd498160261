"""The README's Python code blocks run as written (on the embedded default), so they cannot drift; its layout
section, the console scripts, bin/ and the links of the pages agree with the tree."""

import importlib
import os
import re
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import REPO

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    script = tmp_path / f"block{index}.py"
    script.write_text(BLOCKS[index])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, BLOCKS[index] + "\n" + res.stderr[-3000:]


# ---------------------------------------------------------------- layout: commands, pages, links

README = (REPO / "README.md").read_text()
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_layout_section_follows_the_set_up_near_the_top():
    headings = re.findall(r"^## (.+)$", README, re.M)
    assert headings.index("Layout") == headings.index("Set-up (Python 3.12)") + 1, headings
    # the two set-up commands stay the README's first code block
    first = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert [line.split()[:2] for line in first.splitlines()] == [["make", "quickstart"], ["make", "test"]]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_has_a_bin_wrapper_and_a_main(name):
    module, func = SCRIPTS[name].split(":")
    assert func == "main"
    main = getattr(importlib.import_module(module), func)
    wrappers = [p for p in (REPO / "bin").glob("*.py") if f"from {module} import main" in p.read_text()]
    assert len(wrappers) == 1, (name, wrappers)
    assert f"`{name}` (`bin/{wrappers[0].name}`)" in README  # the layout table names both
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_bin_holds_only_wrappers_of_console_scripts():
    targets = {v.split(":")[0] for v in SCRIPTS.values()}
    for path in (REPO / "bin").glob("*.py"):
        code = [line for line in path.read_text().splitlines() if line and not line.startswith(("#", '"""'))]
        module = re.fullmatch(r"from (\S+) import main", code[0])
        assert module and module.group(1) in targets and code[1:] == ["raise SystemExit(main())"], path


def test_docs_top_level_holds_pages_only():
    stray = sorted(p.name for p in (REPO / "docs").iterdir() if p.is_file() and p.suffix != ".md")
    assert not stray, f"{stray}: figures go to docs/figures/, result data to docs/results/"
    assert list((REPO / "docs" / "figures").glob("*.png")) and list((REPO / "docs" / "results").glob("*.jsonl"))


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")),
                                  *sorted(f"benchmarks/{p.name}" for p in (REPO / "benchmarks").glob("*.md"))])
def test_relative_links_resolve(page):
    path = REPO / page
    broken = [link for link in LINK.findall(path.read_text())
              if not re.match(r"[a-z]+:|#", link) and not (path.parent / link.split("#")[0]).exists()]
    assert not broken, f"{page}: {broken}"


def test_layout_paths_exist():
    section = README.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    paths = [p for p in re.findall(r"`([\w./-]+)`", section) if "/" in p]
    assert len(paths) >= 10
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, missing
