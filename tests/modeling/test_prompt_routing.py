"""The task-aware token router (`router_prompt=True`): every visual token is still routed on its own four projected
features (Eq. 9), plus a bias from the instruction; the answer never reaches it, generation and feature reuse route
with the prompt at hand, and without a prompt it is the paper's router."""

import pytest
import torch
from astrea_testing import prompt_ids, random_pixels

from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration
from modeling_astrea.modeling_astrea import top_k_router_probs


@pytest.fixture
def prompt_model(tiny_config):
    tiny_config.router_prompt = True
    tiny_config.router_prompt_dropout = 0.0
    torch.manual_seed(0)
    return AstreaForConditionalGeneration(tiny_config).eval()


def steer_by_prompt(model) -> tuple[int, int]:
    """prompt_router: detection's logit += 50 * (sum of the prompt embedding). Returns token ids (low, high) whose
    prompts push detection down / up."""
    with torch.no_grad():
        model.model.prompt_router.weight.zero_()
        model.model.prompt_router.weight[2] = 50.0
    sums = model.get_input_embeddings().weight.sum(-1)
    return int(sums.argmin()), int(sums.argmax())


def test_it_starts_as_the_papers_router_and_is_refused_with_sample_routing(prompt_model, tiny_config):
    assert prompt_model.model.prompt_router.weight.abs().sum() == 0  # zero-initialised (post_init)
    pixels = random_pixels(tiny_config, 2)
    ids = torch.tensor([prompt_ids(tiny_config, [5, 6, 7]), prompt_ids(tiny_config, [8, 9, 10])])
    with torch.no_grad():
        with_prompt = prompt_model.model.get_image_features(**pixels, prompt_input_ids=ids)
        alone = prompt_model.model.get_image_features(**pixels)
        features = prompt_model.model.get_expert_features(**pixels)
        projected = [prompt_model.model.projectors[n](features[n]) for n in features]
        expected = top_k_router_probs(prompt_model.model.router(torch.cat(projected, -1)), tiny_config.router_top_k)
    torch.testing.assert_close(with_prompt.router_probs, alone.router_probs)
    torch.testing.assert_close(alone.router_probs, expected)
    with pytest.raises(ValueError, match="router_prompt=True is for router_mode='token'"):
        AstreaConfig.from_dict({**tiny_config.to_dict(), "router_prompt": True, "router_mode": "sample"})
    assert AstreaForConditionalGeneration(AstreaConfig.from_dict(tiny_config.to_dict() | {"router_prompt": False}))


def test_each_token_is_routed_on_its_features_plus_the_prompts_bias(prompt_model, tiny_config):
    low, high = steer_by_prompt(prompt_model)
    pixels = random_pixels(tiny_config, 1)
    probs = {}
    with torch.no_grad():
        features = prompt_model.model.get_expert_features(**pixels)  # the experts once, for both questions
        for token in (low, high):
            ids = torch.tensor([prompt_ids(tiny_config, [token] * 3)])
            reused = prompt_model.model.get_image_features(expert_features=features, prompt_input_ids=ids)
            fresh = prompt_model.model.get_image_features(**pixels, prompt_input_ids=ids)
            torch.testing.assert_close(reused.pooler_output, fresh.pooler_output)  # re-routed, not reused
            probs[token] = reused.router_probs[0]
            prompt = prompt_model.model.image_prompt_embeds(ids)
            projected = [prompt_model.model.projectors[n](features[n]) for n in features]
            logits = prompt_model.model.router(torch.cat(projected, -1)) + prompt_model.model.prompt_router(prompt)
            torch.testing.assert_close(probs[token], top_k_router_probs(logits, tiny_config.router_top_k)[0])
    assert (probs[low][:, 2] == 0).all() and (probs[high][:, 2] > 0.99).all()  # the prompt decides detection
    # tokens still differ from each other under one prompt: the per-token part is kept
    assert not torch.allclose(probs[low][0], probs[low][1])


def test_training_hides_the_answer_from_the_router_and_trains_it(prompt_model, tiny_config):
    low, high = steer_by_prompt(prompt_model)
    prompt_model.train()
    pixels = random_pixels(tiny_config, 1)
    probs = {}
    for answer in (low, high):  # same prompt, different answers
        ids = torch.tensor([prompt_ids(tiny_config, [5, 6, answer, answer, answer])])
        labels = torch.full_like(ids, -100)
        labels[:, -3:] = ids[:, -3:]
        out = prompt_model(input_ids=ids, labels=labels, **pixels)
        probs[answer] = out.router_probs[0].detach()
    torch.testing.assert_close(probs[low], probs[high])
    out.loss.backward()
    assert prompt_model.model.prompt_router.weight.grad.abs().sum() > 0


def test_prompt_dropout_routes_some_training_images_without_their_prompt(prompt_model, tiny_config):
    low, _ = steer_by_prompt(prompt_model)
    prompt_model.config.router_prompt_dropout = 0.5
    prompt_model.train()
    ids = torch.tensor([prompt_ids(tiny_config, [low] * 3)] * 64)
    features = {k: v.expand(64, *v.shape[1:]) for k, v in random_features(prompt_model, tiny_config).items()}
    torch.manual_seed(0)
    with torch.no_grad():
        probs = prompt_model.model.get_image_features(expert_features=features, prompt_input_ids=ids).router_probs
    without = (probs[:, 0, 2] > 0).float().mean()  # detection in the top-k: the prompt's push was dropped
    assert 0.25 < without < 0.75
    prompt_model.eval()
    with torch.no_grad():
        probs = prompt_model.model.get_image_features(expert_features=features, prompt_input_ids=ids).router_probs
    assert (probs[:, :, 2] == 0).all()  # no dropout at evaluation


def random_features(model, config) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.model.get_expert_features(**random_pixels(config, 1))


def test_generate_routes_with_its_prompt(prompt_model, tiny_config):
    low, high = steer_by_prompt(prompt_model)
    pixels = random_pixels(tiny_config, 2)
    ids = torch.tensor([prompt_ids(tiny_config, [low] * 3), prompt_ids(tiny_config, [high] * 3)])
    seen = []
    prompt_model.model.prompt_router.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    with torch.no_grad():
        generated = prompt_model.generate(input_ids=ids, **pixels, max_new_tokens=3, do_sample=False)
        features = prompt_model.model.get_image_features(**pixels, prompt_input_ids=ids)
        reused = prompt_model.generate(
            input_ids=ids, mm_encoder_outputs={"image": features}, max_new_tokens=3, do_sample=False
        )
    assert seen[0] == 2  # generate encoded the images with their prompts
    assert torch.equal(generated, reused)


def test_saved_and_loaded_with_its_prompt_router(prompt_model, tmp_path):
    steer_by_prompt(prompt_model)
    prompt_model.save_pretrained(tmp_path)
    loaded = AstreaForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.router_prompt
    torch.testing.assert_close(loaded.model.prompt_router.weight, prompt_model.model.prompt_router.weight)
