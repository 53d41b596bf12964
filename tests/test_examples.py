"""The README's commands and code run as shown."""

import re
import subprocess
import sys

from astrea_testing import REPO


def test_demo_answers_a_question_about_an_image(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/demo.py", "--model", str(tmp_path / "tiny"), "--max-new-tokens", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Q: What shapes are in the image?" in result.stdout
    assert re.search(r"5 tokens in [0-9.]+s; 16 visual tokens per image", result.stdout)
    shares = [float(x) for x in re.findall(r"(?:caption|classification|detection|segmentation) ([0-9.]+)",
                                           result.stdout)]  # fmt: skip
    assert len(shares) == 4 and abs(sum(shares) - 1) < 0.02


def test_readme_python_snippets_run(tmp_path):
    readme = (REPO / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert snippets, "the README shows Python usage"
    for snippet in snippets:
        result = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert result.returncode == 0, f"{snippet}\n{result.stderr[-3000:]}"
