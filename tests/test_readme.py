"""Every README code block runs as written (tests/readme_check.py: a fresh copy of the repository, offline, Hub
ids and the reader's placeholders provided); blocks that cannot run here are marked with their reason."""

import re
import subprocess
import sys

import pytest

import readme_check
from conftest import ROOT


def test_marked_blocks_name_their_reason_and_markers_sit_on_blocks():
    text = (ROOT / "README.md").read_text()
    found = readme_check.blocks(text)
    assert found, "no code blocks found in README.md"
    markers = len(re.findall(r"^<!--\s*readme-check:", text, flags=re.MULTILINE))
    assert markers == sum(block.skip is not None for block in found), "a readme-check marker not right above a block"


def test_marker_parsing():
    text = "intro\n<!-- readme-check: skip: needs a GPU -->\n```python\nx = 1\n```\n\n```bash\necho hi\n```\n```\noutput\n```\n"
    first, second, third = readme_check.blocks(text)
    assert (first.language, first.skip, first.line, first.code) == ("python", "needs a GPU", 3, "x = 1\n")
    assert (second.language, second.skip) == ("bash", None)
    assert third.language == ""
    with pytest.raises(ValueError, match="never closed"):
        readme_check.blocks("```python\nx = 1\n")
    with pytest.raises(ValueError, match="needs its reason"):
        readme_check.blocks("<!-- readme-check: skip:  -->\n```bash\necho hi\n```\n")
    assert readme_check.with_hub_ids_replaced('f("nvidia/MambaVision-L3-512-21K")', "/x") == 'f("/x")'


def test_a_block_that_uses_a_name_it_does_not_define_fails():
    """Each python block runs alone: a name defined only by an earlier block, or never, fails the check."""
    assert readme_check.run_python("folder = 'converted'\nprint(folder)\n", "block 1") is None
    failure = readme_check.run_python("print(folder)\n", "block 2")
    assert failure and "NameError: name 'folder' is not defined" in failure and "block 2" in failure, failure
    assert "ZeroDivisionError" in readme_check.run_python("1 / 0\n", "block 3")


def test_readme_blocks_run_as_written():
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_check.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)
    summary = [line for line in result.stdout.splitlines() if line.startswith(("ok", "skip", "FAIL"))]
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert any(line.startswith("ok") for line in summary)
