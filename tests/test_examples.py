"""The README's commands and code run as shown."""

import re
import subprocess
import sys

from astrea_testing import REPO


def test_demo_answers_a_question_about_an_image(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/ask.py", "--model", str(tmp_path / "tiny"), "--max-new-tokens", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Q: What shapes are in the image?" in result.stdout
    assert re.search(r"5 tokens in [0-9.]+s; 16 visual tokens per image", result.stdout)
    shares = [
        float(x) for x in re.findall(r"(?:caption|classification|detection|segmentation) ([0-9.]+)", result.stdout)
    ]
    assert len(shares) == 4 and abs(sum(shares) - 1) < 0.02


def run_demo(model_folder) -> subprocess.CompletedProcess:
    command = [sys.executable, "examples/ask.py", "--model", str(model_folder), "--max-new-tokens", "1"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_readme_python_snippets_run(tmp_path):
    """In README order, after `make demo` (whose model folder the pipeline snippet uses)."""
    assert run_demo(REPO / "outputs" / "tiny-random").returncode == 0
    readme = (REPO / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert snippets, "the README shows Python usage"
    for snippet in snippets:
        result = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{snippet}\n{result.stderr[-3000:]}"


def test_chat_streams_answers_and_encodes_the_image_once(tmp_path):
    from PIL import Image

    demo = run_demo(tmp_path / "tiny")
    assert demo.returncode == 0, demo.stderr[-3000:]
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    result = subprocess.run(
        [
            sys.executable,
            "examples/chat.py",
            "--image",
            str(tmp_path / "red.png"),
            "--model",
            str(tmp_path / "tiny"),
            "--max-new-tokens",
            "4",
        ],
        input="What colour is it?\nAnd its shape?\nAnything else?\n\n",
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("astrea> ") == 3
    assert "[3 turns; the experts encoded 1 image(s) in all]" in result.stdout
