"""The README's commands and code run as shown."""

import importlib.util
import io
import re
import subprocess
import sys

import pytest
from astrea_testing import REPO, save_random_tiny


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
    """In README order, in a working folder of their own: the repository's `examples/` is there as in a clone, and
    `outputs/tiny-random` is what `make ask` writes (the pipeline snippet loads it). Nothing goes into the
    repository's own `outputs/`."""
    (tmp_path / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    assert run_demo(tmp_path / "outputs" / "tiny-random").returncode == 0
    readme = (REPO / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert snippets, "the README shows Python usage"
    for snippet in snippets:
        result = subprocess.run(
            [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{snippet}\n{result.stderr[-3000:]}"
    assert (tmp_path / "outputs" / "readme-model" / "config.json").exists()  # the first snippet saved here


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


@pytest.mark.timeout(60)  # the old loop waited forever for the end of the stream
def test_chat_reports_a_failed_generation_in_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    """Out of memory (simulated) inside generate's thread, after two tokens of the first answer."""
    from PIL import Image

    from modeling_astrea import AstreaForConditionalGeneration

    save_random_tiny(tmp_path / "tiny")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    generate = AstreaForConditionalGeneration.generate

    class FailingStreamer:  # the prompt and two tokens reach the real streamer, then generate raises
        def __init__(self, streamer):
            self.streamer, self.puts = streamer, 0

        def put(self, value):
            if self.puts == 3:
                raise RuntimeError("out of memory (simulated)")
            self.puts += 1
            self.streamer.put(value)

        def end(self):
            self.streamer.end()

    def failing_generate(self, *args, streamer, **kwargs):
        return generate(self, *args, streamer=FailingStreamer(streamer), **kwargs)

    monkeypatch.setattr(AstreaForConditionalGeneration, "generate", failing_generate)
    monkeypatch.syspath_prepend(str(REPO / "examples"))  # as `python examples/chat.py` has it (chat.py imports app)
    spec = importlib.util.spec_from_file_location("astrea_chat", REPO / "examples" / "chat.py")
    chat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat)
    image, model = str(tmp_path / "red.png"), str(tmp_path / "tiny")
    monkeypatch.setattr(sys, "argv", ["chat.py", "--image", image, "--model", model, "--max-new-tokens", "8"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("What colour is it?\nAnd its shape?\n\n"))
    with pytest.raises(SystemExit) as exit_info:
        chat.main()
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert out.count("astrea> ") == 1  # no second question after the failure
    assert "turns; the experts encoded" not in out
    assert err.splitlines()[-1] == "chat.py: generation failed: RuntimeError: out of memory (simulated)"
