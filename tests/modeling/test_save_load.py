"""save_pretrained / from_pretrained, the Auto classes, and remote code without this package installed."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from astrea_testing import BLOCK_PACKAGE, prompt_ids, random_pixels
from transformers import AutoConfig, AutoModelForImageTextToText

from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration


def inputs(config):
    ids = torch.tensor([prompt_ids(config, [40, 41, 42])])
    return {"input_ids": ids, **random_pixels(config, 1)}


def test_importing_registers_the_auto_classes(tiny_config):
    assert type(AutoConfig.for_model("astrea")) is AstreaConfig
    model = AutoModelForImageTextToText.from_config(tiny_config)
    assert type(model) is AstreaForConditionalGeneration


def test_save_and_load_give_identical_logits(tiny_model, tiny_config, tmp_path):
    tiny_model.moco.enqueue(torch.randn(3, tiny_config.moco_embed_dim))  # buffers travel too
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_astrea.AstreaConfig",
        "AutoModel": "modeling_astrea.AstreaModel",  # the base model, which vLLM's Transformers backend loads
        "AutoModelForImageTextToText": "modeling_astrea.AstreaForConditionalGeneration",
    }
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    saved, restored = tiny_model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)  # every weight and buffer, bit for bit
    batch = inputs(tiny_config)
    with torch.no_grad():  # equal weights, but the CPU kernels may sum in another order (seen: 2e-7 on AMD EPYC)
        torch.testing.assert_close(loaded(**batch).logits, tiny_model(**batch).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.moco.queue, tiny_model.moco.queue)
    assert not any(p.requires_grad for p in loaded.model.experts.parameters())


def test_remote_code_loads_without_the_package(tiny_model, tiny_config, tmp_path):
    folder = tmp_path / "exported"
    tiny_model.save_pretrained(folder)
    assert {"configuration_astrea.py", "modeling_astrea.py", "modeling_astrea_tagger.py"} <= {
        p.name for p in folder.glob("*.py")
    }
    batch = inputs(tiny_config)
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(tiny_model(**batch).logits, tmp_path / "expected.pt")
    script = BLOCK_PACKAGE + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForImageTextToText
        try:
            import modeling_astrea
            raise SystemExit("the package is importable")
        except ModuleNotFoundError:
            pass
        model = AutoModelForImageTextToText.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            logits = model(**batch).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=1e-5)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        print("REMOTE-OK", type(model).__name__, tuple(out.shape))
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK AstreaForConditionalGeneration" in result.stdout


def test_return_dict_false_gives_tuples_in_the_documented_order(tiny_model, tiny_config):
    """As transformers' own models do (and vLLM's Transformers backend calls the base model this way)."""
    batch = inputs(tiny_config)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == tiny_config.image_token_id, -100)
    with torch.no_grad():
        full = tiny_model(**batch, labels=labels, use_cache=False)
        flat = tiny_model(**batch, labels=labels, use_cache=False, return_dict=False)
        base = tiny_model.model(**batch)
        base_flat = tiny_model.model(**batch, return_dict=False)
        features = tiny_model.get_image_features(**random_pixels(tiny_config, 2))
        features_flat = tiny_model.get_image_features(**random_pixels(tiny_config, 2), return_dict=False)
    assert isinstance(flat, tuple) and isinstance(base_flat, tuple) and isinstance(features_flat, tuple)
    assert len(flat) == len(full.to_tuple())
    for got, want in zip(flat, full.to_tuple(), strict=True):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want)
    torch.testing.assert_close(flat[0], full.loss)  # loss, loss_reg, loss_moco, logits, ...
    torch.testing.assert_close(base_flat[0], base.last_hidden_state)
    # last_hidden_state (the experts' features), pooler_output (the fused tokens), router_probs
    torch.testing.assert_close(features_flat[0], features.last_hidden_state)
    torch.testing.assert_close(features_flat[1], features.pooler_output)
    assert features_flat[1].shape == (2, tiny_config.num_image_tokens, tiny_config.text_config.hidden_size)


def test_the_base_model_loads_from_a_whole_model_folder_without_the_moco_weights(tiny_model, tmp_path):
    from transformers import AutoModel

    tiny_model.save_pretrained(tmp_path)
    base, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(base).__name__ == "AstreaModel"
    assert not [key for key in info["unexpected_keys"] if key.startswith("moco.")]
    assert not info["missing_keys"]
    torch.testing.assert_close(base.router.weight, tiny_model.model.router.weight)


def test_a_config_that_asks_for_tuples_still_runs_inside(tiny_config):
    """With `config.return_dict=False` the outer call returns a tuple; the calls inside still get outputs."""
    tiny_config.return_dict = False
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(tiny_config).eval()
    batch = inputs(tiny_config)
    with torch.no_grad():
        flat = model(**batch)
        full = model(**batch, return_dict=True)
        embeddings = model.get_image_embeddings(**random_pixels(tiny_config, 2))
    assert isinstance(flat, tuple)
    torch.testing.assert_close(flat[0], full.logits)
    assert embeddings.shape == (2, tiny_config.moco_embed_dim)


def test_inputs_embeds_with_images_give_the_input_ids_logits(tiny_model, tiny_config):
    """As transformers' LLaVA models: without input_ids the image positions are where the embedding is the image
    token's."""
    batch = inputs(tiny_config)
    input_ids = batch.pop("input_ids")
    embeds = tiny_model.get_input_embeddings()(input_ids)
    with torch.no_grad():
        from_ids = tiny_model(input_ids=input_ids, **batch).logits
        from_embeds = tiny_model(inputs_embeds=embeds, **batch).logits
        two_images = random_pixels(tiny_config, 2)
        with pytest.raises(ValueError, match="2 images were given"):
            tiny_model(inputs_embeds=embeds, **two_images)
    torch.testing.assert_close(from_embeds, from_ids)


def test_a_checkpoint_from_before_the_moco_standardization_loads_it_as_the_identity(tiny_model, tmp_path):
    """A folder saved before `RunningStandardization` existed lacks its moments: they load as the identity, and the
    MoCo heads keep their own weights (the momentum head is not re-copied from the online one)."""
    from safetensors.torch import load_file, save_file

    with torch.no_grad():
        tiny_model.moco.momentum_head[0].weight.add_(1.0)  # unlike the online head, as after training
    tiny_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    old = {key: value for key, value in weights.items() if not key.startswith(("moco.image_norm.", "moco.text_norm."))}
    assert len(old) == len(weights) - 6  # mean, var, updates of the image side and the text side
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AstreaForConditionalGeneration.from_pretrained(tmp_path)
    for norm in (loaded.moco.image_norm, loaded.moco.text_norm):
        assert torch.equal(norm.mean, torch.zeros_like(norm.mean)) and torch.equal(norm.var, torch.ones_like(norm.var))
        assert int(norm.updates) == 0
    torch.testing.assert_close(loaded.moco.momentum_head[0].weight, tiny_model.moco.momentum_head[0].weight)
