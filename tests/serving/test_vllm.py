"""Astrea served by vLLM's Transformers backend (`make test-serve`): the greedy tokens of `generate()` offline, with
tensor parallel 2, and through the OpenAI server; bad requests refused with an HTTP 400 while the server keeps
serving; a trained model's held-out accuracy the same both ways.

vLLM runs in the serving environment (`.venv-serve`, `make install-serve`), where this package is not installed:
the model folders' own remote code runs there, under the transformers release vLLM pins. These tests build the
folders here and drive that environment through `serving/vllm_check.py` and `serving/serve.py`.
"""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from astrea_testing import REPO, save_servable_tiny
from PIL import Image

sys.path.insert(0, str(REPO / "serving"))
from launch import SERVE_PYTHON, running_server  # noqa: E402
from vllm_check import post, served_model  # noqa: E402

pytestmark = pytest.mark.serve

CHECK = REPO / "serving" / "vllm_check.py"
ARCHITECTURE = "TransformersMultiModalForCausalLM"  # vLLM's Transformers backend, multimodal (not text-only)


@pytest.fixture(scope="module", autouse=True)
def serving_environment():
    if not SERVE_PYTHON.exists():
        pytest.fail(f"{SERVE_PYTHON} is missing: run `make install-serve` (make test-serve does).")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_servable_tiny(tmp_path_factory.mktemp("servable"))


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory) -> Path:
    """Six noise images of different sizes with the same question, and one request with two images (so that answers
    that differ can only differ by their image)."""
    folder = tmp_path_factory.mktemp("requests")
    rng = np.random.default_rng(1)
    rows = []
    for index in range(6):
        pixels = rng.integers(0, 255, (48 + 8 * index, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
        rows.append({"image": f"{index}.png", "question": "What is in the picture?"})
    rows.append({"image": ["0.png", "3.png"], "question": "What differs between the two?"})
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_check(*args, tmp: Path, timeout: int = 600) -> tuple[int, dict, str]:
    output = tmp / f"result-{time.monotonic_ns()}.json"
    process = subprocess.Popen(
        [str(SERVE_PYTHON), str(CHECK), *map(str, args), "--output", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # vLLM's engine and workers are its children: a timeout stops them all
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"vllm_check.py {args[0]} ran past {timeout} s:\n{stderr[-3000:]}")
    result = json.loads(output.read_text()) if output.exists() else {}
    return process.returncode, result, stdout[-3000:] + stderr[-3000:]


def assert_identical(result: dict, log: str, requests: int):
    assert result.get("requests") == requests, log
    assert result["different"] == [], f"requests {result['different']} differ: {result['texts']}"
    assert result["identical"] == requests
    # the comparison means something only if the model's answers depend on the image (same question throughout)
    assert len({tuple(tokens) for tokens in result["generate"][:6]}) > 1, result["texts"]
    assert all(len(tokens) > 0 for tokens in result["generate"])


def test_offline_generation_gives_generate_tokens(model_dir, requests_file, tmp_path):
    code, result, log = run_check("offline", "--model", model_dir, "--requests", requests_file, tmp=tmp_path)
    assert code == 0, log
    assert result["vllm_architecture"] == ARCHITECTURE
    assert_identical(result, log, requests=7)


def test_tensor_parallel_2_gives_generate_tokens(model_dir, requests_file, tmp_path):
    """Two ranks on the two CPU cores: the LLM split by heads, the experts whole on each rank (serving/vllm_plugin;
    without it vLLM splits the experts' attention too, and the tagger's Swin fails)."""
    code, result, log = run_check(
        "offline", "--model", model_dir, "--requests", requests_file, "--tensor-parallel-size", "2", tmp=tmp_path
    )
    assert code == 0, log
    assert_identical(result, log, requests=7)


def test_a_trained_model_scores_the_same_through_vllm(tmp_path):
    """The demo recipe, scaled down: its held-out questions answered through vLLM and through generate()."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "extends": str(REPO / "training" / "recipes" / "tiny.yaml"),
                "output_dir": str(tmp_path / "run"),
                "cache_dir": str(tmp_path / "cache"),
                "data": {"num_train": 400, "num_test": 40},
                "expert_pretraining": {"steps": 60, "num_images": 400},
                "prealign": {"stage_steps": [6, 3, 3, 3], "save_steps": 1000},
                "instruct": {"steps": 60, "save_steps": 1000},
            }
        )
    )
    train = [sys.executable, "-m", "astrea.training.cli", "all", "--recipe", str(recipe)]
    trained = subprocess.run(train, cwd=REPO, timeout=900, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-4000:]
    benchmark = tmp_path / "benchmark"
    written = subprocess.run(
        [sys.executable, "-m", "astrea.evaluation.cli", "synthetic", "--output", str(benchmark), "--num-images", "40"],
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert written.returncode == 0, written.stderr[-4000:]
    code, result, log = run_check(
        "offline", "--model", tmp_path / "run" / "model", "--requests", benchmark / "vqa.jsonl", tmp=tmp_path
    )
    assert code == 0, log
    assert result["requests"] > 40
    accuracy = result["accuracy"]
    assert accuracy["vllm"] == accuracy["generate"], accuracy
    assert 0 < accuracy["generate"] < 1  # trained a little: right on some questions, so the scores can differ


@pytest.fixture(scope="module")
def server(model_dir):
    """`serving/serve.py` on the servable tiny model; yields (url, the launcher's printed output)."""
    with running_server(model_dir, "--enforce-eager", "--dtype", "float32") as started:
        yield started


def test_server_answers_like_generate(server, model_dir, requests_file, tmp_path):
    url, _ = server
    code, result, log = run_check(
        "server", "--url", url, "--model", model_dir, "--requests", requests_file, "--concurrency", "4", tmp=tmp_path
    )
    assert code == 0, log
    assert_identical(result, log, requests=7)


def test_the_printed_curl_request_is_answered(server):
    url, printed = server
    curl = next(line for line in printed.splitlines() if line.startswith("curl "))
    assert url in curl
    answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
    reply = json.loads(answer.stdout)
    assert reply["choices"][0]["message"]["content"], reply


def chat(url: str, content: list[dict]) -> tuple[int, dict]:
    """(HTTP status, reply) of one chat request."""
    body = {"model": served_model(url), "max_tokens": 4, "temperature": 0}
    reply = post(url + "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": content}]})
    return reply.get("status", 200), reply


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content, says",
    [
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!not base64!!"}}], "base64"),
        ([image_part(b"these bytes are not an image")], "image"),
        ([image_part(png())] * 5, "At most 4 image"),  # serve.py's --max-images default
        ([{"type": "text", "text": "<image>\nWhat colour is it?"}], "placeholder"),  # an image nobody attached
    ],
    ids=["corrupt-base64", "not-an-image", "too-many-images", "placeholder-without-image"],
)
def test_bad_requests_get_a_400_and_the_server_keeps_serving(server, content, says):
    url, _ = server
    status, reply = chat(url, [*content, {"type": "text", "text": "What colour is it?"}])
    assert status == 400, reply
    assert says.lower() in json.dumps(reply).lower(), reply
    status, reply = chat(url, [image_part(png()), {"type": "text", "text": "What colour is it?"}])
    assert status == 200 and reply["choices"][0]["message"]["content"], reply
