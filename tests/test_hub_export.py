"""astrea-hub: the exported folder, its model card, loading it where the package is absent and the network is
cut, and pushing it (with huggingface_hub's calls recorded instead of sent)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml
from astrea_testing import BLOCK_PACKAGE, TINY, save_random_tiny

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
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
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
