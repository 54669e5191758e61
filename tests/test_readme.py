"""Every command of README.md and docs/*.md runs as written, in a copy of the repository, after the two commands.

A ```bash block runs here: each is run whole by bash -e, in order, README.md first, then docs/evaluation.md,
docs/lora.md, docs/plus.md and docs/bases.md; then the page's ```python blocks, by python. A ```shell block needs what this machine lacks (downloads, GPUs) and is only read.
Training is shortened, nothing else is changed: `python train.py` gets --max_steps 2 and small batches appended, and
`python make_bases.py` a few steps of each phase (the flags given last win). `pip install` is .ci/run's, and
`python -m pytest` is this very test suite: both are skipped. The files the README asks the reader to write
(my_data/train.json, from its JSON block, and the image it names) are written first."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "docs/evaluation.md", "docs/lora.md", "docs/plus.md", "docs/bases.md"]  # bases.md remakes the
# bases, which the models trained before it no longer fit (train.py refuses them): it comes last
SHORTER = f"""
set -e
pip() {{ echo "(pip install: .ci/run installs)"; }}
python() {{
    case "$1" in
        train.py) command "{sys.executable}" "$@" --max_steps 2 --global_batch_size 4 --batch_size 4 \\
                  --eval_samples 4 --threads 1 ;;
        make_bases.py) command "{sys.executable}" "$@" --clip_steps 2 --color_steps 1 --position_steps 1 \\
                       --facts_steps 1 --llm_steps 2 --llm_eval_every 0 --threads 1 ;;
        -m) if [ "$2" = pytest ]; then echo "(the tests: this is one of them)"; else command "{sys.executable}" "$@"; fi ;;
        *) command "{sys.executable}" "$@" ;;
    esac
}}
"""


def blocks(page, language):
    """The code blocks of a markdown page in that language, in order."""
    with open(os.path.join(REPO, page)) as f:
        return re.findall(rf"^```{language}\n(.*?)^```", f.read(), flags=re.M | re.S)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """A copy of the repository's tracked files (no out/, no cache/), with the files the README asks for."""
    copy = tmp_path_factory.mktemp("readme") / "tinyllava"
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode == 0:
        for name in listed.stdout.splitlines():
            os.makedirs((copy / name).parent, exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), copy / name)
    else:  # not a git checkout
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", "out", "cache", "__pycache__"))
    (copy / "my_data" / "images").mkdir(parents=True)
    (copy / "my_data" / "train.json").write_text(blocks("README.md", "json")[0])
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(copy / "my_data" / "images" / "kitchen.jpg")
    return copy


@pytest.mark.parametrize("page", PAGES)
def test_every_bash_block_runs_as_written(repository, page):
    assert blocks(page, "bash"), f"{page} has no ```bash block"
    json.loads(blocks("README.md", "json")[0])  # the data the README shows is valid JSON
    for number, block in enumerate(blocks(page, "bash"), 1):
        result = subprocess.run(["bash", "-c", SHORTER + block], cwd=repository, capture_output=True, text=True,
                                input="How many circles are there?\n", timeout=600)
        assert result.returncode == 0, (f"{page}, bash block {number}:\n{block}\n--- output:\n"
                                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for number, block in enumerate(blocks(page, "python"), 1):  # after the page's commands, which make its files
        result = subprocess.run([sys.executable, "-c", block], cwd=repository, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{page}, python block {number}:\n{block}\n--- output:\n{result.stderr[-3000:]}"


def test_the_readme_file_table_counts_each_files_lines():
    """The README's table of files says how long each is: the counts must be today's."""
    with open(os.path.join(REPO, "README.md")) as f:
        rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", f.read(), flags=re.M)
    assert len(rows) >= 10, "the README's file table was not found"
    for name, stated in rows:
        paths = [os.path.join(REPO, name)] if not name.endswith("/") else [
            os.path.join(REPO, name, f) for f in os.listdir(os.path.join(REPO, name)) if f.endswith(".py")]
        with_lines = sum(len(open(path).read().splitlines()) for path in paths)
        assert int(stated) == with_lines, f"README says {name} has {stated} lines; it has {with_lines}"
    listed = {name for name, _ in rows}
    scripts = {f for f in os.listdir(REPO) if f.endswith(".py")}
    assert scripts <= listed, f"files missing from the README's table: {sorted(scripts - listed)}"


def test_the_readme_stays_a_first_page():
    with open(os.path.join(REPO, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move a deep dive to docs/ (250 at most)"
