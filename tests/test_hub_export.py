"""astrea-hub: the exported folder, its model card, loading it where the package is absent and the network is
cut, and pushing it (with huggingface_hub's calls recorded instead of sent, or sent to a fake Hub on this machine
by the installed `astrea-hub` command)."""

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
import yaml
from astrea_testing import BLOCK_PACKAGE, TINY, save_random_tiny
from safetensors.torch import load_file

from astrea.hub_cards import export
from astrea.hub_cards.cli import main as astrea_hub
from astrea.training.recipe import Recipe
from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration

#: what `astrea-train` writes next to a model folder, with the numbers made up here
METRICS = {
    "accuracy": {"colour": 0.853, "position": 0.507},
    "chance": {"colour": 0.1667, "position": 0.5},
    "count": {"colour": 252, "position": 148},
    "router": {
        "colour": {"caption": 0.1, "classification": 0.2, "detection": 0.3, "segmentation": 0.4},
        "position": {"caption": 0.4, "classification": 0.3, "detection": 0.2, "segmentation": 0.1},
    },
}
NO_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise OSError("this test cuts the network")
socket.socket.connect = _refuse
socket.create_connection = _refuse
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's folder: model/, metrics.json, recipe.json, router.png."""
    folder = tmp_path_factory.mktemp("run")
    save_random_tiny(folder / "model")
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    (folder / "recipe.json").write_text(json.dumps(Recipe().to_dict()))
    (folder / "router.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    return export.export_model(run_dir / "model", tmp_path_factory.mktemp("hub") / "out", repo_id="someone/astrea-x")


def card_sections(text: str) -> tuple[dict, str]:
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_the_folder_holds_weights_remote_code_processor_and_a_card(exported):
    names = {p.name for p in exported.iterdir()}
    expected = {"model.safetensors", "config.json", "modeling_astrea.py", "configuration_astrea.py"}
    expected |= {"processing_astrea.py", "image_processing_astrea.py", "tokenizer.json", "chat_template.jinja"}
    assert expected | {"README.md", "router.png", "processor_config.json"} <= names
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_astrea.AstreaForConditionalGeneration"
    for sub in ("text_config", "caption_config", "classification_config", "detection_config", "segmentation_config"):
        assert isinstance(config[sub], dict) and config[sub]["model_type"]  # embedded: nothing to fetch


def test_the_card_carries_the_runs_numbers_recipe_router_and_limitations(exported):
    meta, body = card_sections((exported / "README.md").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["license"] == "apache-2.0" and "custom_code" in meta["tags"]
    assert "| colour | 85.3% | 16.7% | 252 |" in body
    assert "| position | 0.40 | 0.30 | 0.20 | 0.10 |" in body and "![router contributions](router.png)" in body
    assert "Position questions are answered at chance (50.7%; chance 50.0%)." in body
    assert "Colour questions are answered at chance" not in body
    assert "caption (2000 steps) → classification (500 steps)" in body  # the default recipe's stages
    assert 'repo = "someone/astrea-x"' in body
    assert yaml.safe_load(body.split("```yaml\n")[1].split("```")[0]) == Recipe().to_dict()
    assert body.count("random initialisation") >= 5  # every part of this model is random


def test_the_cards_usage_snippet_runs_from_the_folder_without_the_package_or_a_network(exported, tmp_path):
    _, body = card_sections((exported / "README.md").read_text())
    snippet = re.search(r"```python\n(.*?)```", body, re.S).group(1).replace("someone/astrea-x", str(exported))
    script = (
        BLOCK_PACKAGE
        + NO_NETWORK
        + snippet
        + textwrap.dedent("""
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        print("SNIPPET-OK")
    """)
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    env.pop("HF_HUB_OFFLINE", None)  # the cut network is the check, not the offline switch
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SNIPPET-OK" in result.stdout


def test_known_parts_get_their_licences_and_hub_ids_reach_the_metadata(run_dir):
    assert export._license("google/siglip-so400m-patch14-384") == "apache-2.0"
    assert export._license("lmsys/vicuna-7b-v1.5") == "llama2"
    assert export._license("someone/their-llm") == "see its model card"
    model = AstreaForConditionalGeneration(AstreaConfig.from_pretrained(TINY))
    model.config.base_models = {"llm": "lmsys/vicuna-7b-v1.5", "caption": "google/siglip-so400m-patch14-384"}
    meta, body = card_sections(export.render_model_card(model, "me/x"))
    assert meta["base_model"] == ["lmsys/vicuna-7b-v1.5", "google/siglip-so400m-patch14-384"]
    assert meta["license"] == "other"  # llama2 and apache-2.0 parts together
    assert "| language model | `lmsys/vicuna-7b-v1.5` | `LlamaModel` |" in body and "| llama2 |" in body


def test_push_uploads_the_folder_through_huggingface_hub(exported, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "huggingface_hub.HfApi.create_repo",
        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or f"https://hf.co/{repo_id}",
    )
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    assert astrea_hub(["push", "--folder", str(exported), "--repo-id", "someone/astrea-x", "--private"]) == 0
    assert calls[0] == ("create", "someone/astrea-x", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][1]["folder_path"] == str(exported) and calls[1][1]["repo_id"] == "someone/astrea-x"


def test_bad_arguments_are_one_line_errors(run_dir, tmp_path, capsys):
    assert astrea_hub(["export", "--model", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "is not a model folder" in capsys.readouterr().err
    args = ["export", "--model", str(run_dir / "model"), "--output", str(tmp_path / "o"), "--push"]
    assert astrea_hub(args) == 2
    assert "--push needs --repo-id" in capsys.readouterr().err
    assert astrea_hub(["push", "--folder", str(tmp_path), "--repo-id", "a/b"]) == 2
    assert "is not an exported folder" in capsys.readouterr().err


# --- the installed `astrea-hub` command --------------------------------------------------------------------------

ASTREA_HUB = Path(sys.executable).with_name("astrea-hub")
#: what `astrea-eval run` writes (summary.json) and a second `astrea-train` metrics.json, numbers made up here: the
#: card must show these, given with --results, and not the run's own metrics.json
EVAL_SUMMARY = {
    "model": "outputs/demo/model",
    "data": "bench/all.jsonl",
    "device": "cpu",
    "count": 17,
    "tasks": {
        "vqa": {"count": 12, "vqa_accuracy": 0.41667, "categories": {"shape": {"count": 12, "vqa_accuracy": 0.41667}}},
        "caption": {"count": 5, "bleu4": 0.12345, "cider": 0.56789},
    },
    "seconds": 3.1,
}
CLI_METRICS = {
    **METRICS,
    "accuracy": {"colour": 0.2, "position": 0.731},
    "router": {
        "colour": {"caption": 0.25, "classification": 0.15, "detection": 0.35, "segmentation": 0.25},
        "position": {"caption": 0.05, "classification": 0.15, "detection": 0.6, "segmentation": 0.2},
    },
}


def astrea_hub_command(*args, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ASTREA_HUB), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def cli_exported(run_dir, tmp_path_factory):
    """`astrea-hub export --results ...` run as a user runs it: (the folder it was told to write, the process)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "summary.json").write_text(json.dumps(EVAL_SUMMARY))
    (root / "metrics.json").write_text(json.dumps(CLI_METRICS))
    folder = root / "astrea-cli"
    args = ["export", "--model", run_dir / "model", "--output", folder, "--repo-id", "someone/astrea-cli"]
    args += ["--results", root / "summary.json", root / "metrics.json", "--title", "Astrea from the command line"]
    result = astrea_hub_command(*args, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, result


def test_export_on_the_command_line_writes_the_folder_and_a_card_with_the_results_numbers(cli_exported, run_dir):
    folder, result = cli_exported
    assert f"wrote {folder}/" in result.stdout
    names = {p.name for p in folder.iterdir()}
    remote_code = {"modeling_astrea.py", "configuration_astrea.py", "processing_astrea.py"}
    remote_code |= {"image_processing_astrea.py", "modeling_astrea_tagger.py"}
    processor = {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert {"model.safetensors", "config.json", "README.md", "router.png"} | remote_code | processor <= names
    exported, trained = load_file(folder / "model.safetensors"), load_file(run_dir / "model" / "model.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)

    meta, body = card_sections((folder / "README.md").read_text())
    assert meta["license"] == "apache-2.0" and "custom_code" in meta["tags"]
    assert "\n# Astrea from the command line\n" in body and 'repo = "someone/astrea-cli"' in body
    # the astrea-eval summary
    assert "`astrea-eval run` on `bench/all.jsonl`:" in body
    assert "| vqa | 12 | vqa_accuracy 0.417 |" in body and "| caption | 5 | bleu4 0.123, cider 0.568 |" in body
    # the astrea-train metrics given on the command line, with their router and limitations, not the run's own
    assert "| colour | 20.0% | 16.7% | 252 |" in body and "| position | 73.1% | 50.0% | 148 |" in body
    assert "| position | 0.05 | 0.15 | 0.60 | 0.20 |" in body
    assert "Colour questions are answered at chance (20.0%; chance 16.7%)." in body
    assert "85.3%" not in body and "Position questions are answered at chance" not in body
    assert "caption (2000 steps) → classification (500 steps)" in body  # recipe.json from the run's folder


class FakeHub(BaseHTTPRequestHandler):
    """The Hub's API as far as `HfApi.create_repo` and `upload_folder` use it, answering as the Hub does for small
    files (sent inline in the commit, no LFS). The server's `requests` list keeps every request."""

    def do_GET(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        self.server.requests.append(
            {"method": self.command, "path": path, "authorization": self.headers.get("Authorization"), "body": body}
        )
        here = f"http://127.0.0.1:{self.server.server_port}"
        if path == "/api/repos/create":
            repo = json.loads(body)
            answer = {"url": f"{here}/{repo['organization']}/{repo['name']}"}
        elif path == "/api/validate-yaml":
            answer = {}
        elif re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/main", path):
            files = json.loads(body)["files"]
            answer = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        elif commit := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/main", path):
            oid = f"{len(self.server.requests):040x}"
            answer = {"commitUrl": f"{here}/{commit[1]}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        else:  # anything else (huggingface_hub's agent-harness registry, ...) is not there
            answer = None
        data = json.dumps(answer if answer is not None else {"error": "not found"}).encode()
        self.send_response(200 if answer is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_PUT = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.mark.parametrize("command", ["push", "export --push"])
def test_push_on_the_command_line_uploads_the_folder_to_the_hub(command, cli_exported, run_dir, fake_hub, tmp_path):
    endpoint = f"http://127.0.0.1:{fake_hub.server_port}"
    if command == "push":
        folder = cli_exported[0]
        args = ["push", "--folder", folder, "--repo-id", "someone/astrea-cli", "--private"]
    else:
        folder = tmp_path / "astrea-cli"
        args = ["export", "--model", run_dir / "model", "--output", folder, "--push"]
        args += ["--repo-id", "someone/astrea-cli"]
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.update(NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        env.pop(name, None)
    result = astrea_hub_command(*args, "--token", "hf_test_token", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"pushed {folder} to {endpoint}/someone/astrea-cli" in result.stdout

    api = [r for r in fake_hub.requests if r["path"].startswith(("/api/repos/", "/api/validate-yaml", "/api/models/"))]
    assert api and all(r["authorization"] == "Bearer hf_test_token" for r in api)
    assert api[0]["path"] == "/api/repos/create"  # the repository first
    create = json.loads(api[0]["body"])
    assert (create["organization"], create["name"]) == ("someone", "astrea-cli")
    private = create.get("visibility") == "private" or create.get("private") is True
    assert private == (command == "push")
    commits = [r for r in api if r["path"] == "/api/models/someone/astrea-cli/commit/main"]
    assert commits
    uploaded = {}
    for commit in commits:
        lines = [json.loads(line) for line in commit["body"].splitlines()]
        assert lines[0]["key"] == "header" and lines[0]["value"]["summary"] == "Upload Astrea"
        files = [line["value"] for line in lines if line["key"] == "file"]
        uploaded |= {file["path"]: base64.b64decode(file["content"]) for file in files}
    assert uploaded == {p.name: p.read_bytes() for p in folder.iterdir()}  # every file, byte for byte
    assert {"model.safetensors", "README.md", "modeling_astrea.py", "processor_config.json"} <= uploaded.keys()
