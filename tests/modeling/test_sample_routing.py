"""Sample-level routing (`router_mode="sample"`): one top-k choice per image, from its global feature and the
prompt; experts outside every image's top-k do not run."""

import pytest
import torch
from astrea_testing import prompt_ids, random_pixels

from modeling_astrea import EXPERT_NAMES, AstreaConfig, AstreaForConditionalGeneration


@pytest.fixture
def sample_model(tiny_config):
    tiny_config.router_mode = "sample"
    torch.manual_seed(0)
    return AstreaForConditionalGeneration(tiny_config).eval()


def count_expert_calls(model) -> dict[str, int]:
    calls = dict.fromkeys(EXPERT_NAMES, 0)
    for name in EXPERT_NAMES:
        model.model.experts[name].register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def steer_router(model, bias: list[float]) -> None:
    """Router logits = bias for every image, whatever it reads."""
    with torch.no_grad():
        model.model.router.weight.zero_()
        model.model.router.bias.copy_(torch.tensor(bias))


def test_unknown_router_mode_is_refused(tiny_config):
    with pytest.raises(ValueError, match="router_mode='per-pixel' must be 'token' or 'sample'"):
        AstreaConfig.from_dict({**tiny_config.to_dict(), "router_mode": "per-pixel"})


def test_experts_outside_the_top_k_do_not_run_and_the_rest_mix_as_eq_10(sample_model, tiny_config):
    steer_router(sample_model, [2.0, 1.0, 0.5, -3.0])  # top-3 leaves segmentation out
    calls = count_expert_calls(sample_model)
    pixels = random_pixels(tiny_config, 2)
    with torch.no_grad():
        out = sample_model.model.get_image_features(**pixels)
        features = sample_model.model.get_expert_features(**pixels)
    assert calls == {"caption": 2, "classification": 2, "detection": 2, "segmentation": 1}  # segmentation: ours
    probs = torch.tensor([2.0, 1.0, 0.5]).softmax(-1)
    with torch.no_grad():
        expected = sum(
            p * sample_model.model.adapters[name](sample_model.model.projectors[name](features[name]))
            for p, name in zip(probs, EXPERT_NAMES[:3], strict=True)
        )
    torch.testing.assert_close(out.pooler_output, expected)
    assert out.router_probs.shape == (2, tiny_config.num_image_tokens, 4)
    torch.testing.assert_close(out.router_probs[:, 0, :3], probs.expand(2, 3))
    assert (out.router_probs[..., 3] == 0).all()


def test_an_expert_runs_only_on_the_images_that_chose_it(sample_model, tiny_config):
    steer_router(sample_model, [0.0, 0.0, 0.0, 0.0])
    with torch.no_grad():  # detection's logit = the sum of the prompt embedding; the others' = 0
        sample_model.model.router.weight[2, sample_model.config.text_config.hidden_size :] = 1.0
    sample_model.config.router_top_k = 2
    calls, sizes = count_expert_calls(sample_model), []
    sample_model.model.experts["detection"].register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    sums = sample_model.get_input_embeddings().weight.sum(-1)
    low, high = int(sums.argmin()), int(sums.argmax())  # prompts that push detection's logit down / up
    ids = torch.tensor([prompt_ids(tiny_config, [low] * 3), prompt_ids(tiny_config, [high] * 3)])
    prompt = sample_model.model.image_prompt_embeds(ids)
    assert prompt.shape == (2, tiny_config.text_config.hidden_size)
    assert prompt[0].sum() < 0 < prompt[1].sum()
    with torch.no_grad():
        out = sample_model.model.get_image_features(**random_pixels(tiny_config, 2), prompt_input_ids=ids)
    chosen = out.router_probs[:, 0] > 0
    assert chosen.sum(-1).tolist() == [2, 2]
    assert chosen[:, 2].tolist() == [False, True]
    assert calls["detection"] == 1 and sizes == [1]  # one run, on image 1 alone


def test_the_router_reads_the_prompt_but_not_the_answer(sample_model, tiny_config):
    pixels = random_pixels(tiny_config, 1)
    ids = torch.tensor([prompt_ids(tiny_config, [5, 6, 7, 8, 9])])
    other = torch.tensor([prompt_ids(tiny_config, [10, 11, 12, 8, 9])])
    answer_changed = torch.tensor([prompt_ids(tiny_config, [5, 6, 7, 20, 21])])
    labels_mask = torch.ones_like(ids, dtype=torch.bool)
    labels_mask[:, -2:] = False  # the last two tokens are the answer
    with torch.no_grad():
        probs = {
            name: sample_model.model.get_image_features(
                **pixels, prompt_input_ids=x, prompt_mask=labels_mask
            ).router_probs[0, 0]
            for name, x in (("ids", ids), ("other", other), ("answer_changed", answer_changed))
        }
    assert not torch.allclose(probs["ids"], probs["other"])
    torch.testing.assert_close(probs["ids"], probs["answer_changed"])


def prompt_steered(model, config):
    """Detection's logit = -0.5 + 10 * (sum of the prompt embedding); caption and classification at 1.0, top-2.
    Returns prompts (low, high) that keep detection out / bring it in."""
    steer_router(model, [1.0, 1.0, -0.5, -5.0])
    with torch.no_grad():
        model.model.router.weight[2, config.text_config.hidden_size :] = 10.0
    model.config.router_top_k = 2
    sums = model.get_input_embeddings().weight.sum(-1)
    return int(sums.argmin()), int(sums.argmax())


def test_training_hides_the_answer_from_the_router_and_reaches_it(sample_model, tiny_config):
    sample_model.train()
    low, high = prompt_steered(sample_model, tiny_config)
    pixels = random_pixels(tiny_config, 1)
    with torch.no_grad():
        sample_model.model.router.weight[2, tiny_config.text_config.hidden_size :] = 100.0
    probs, unlabelled = {}, {}
    for answer in (low, high):  # the answer tokens differ; the prompt is the same
        ids = torch.tensor([prompt_ids(tiny_config, [5, 6, answer, answer, answer])])
        labels = torch.full_like(ids, -100)
        labels[:, -3:] = ids[:, -3:]
        out = sample_model(input_ids=ids, labels=labels, **pixels)
        probs[answer] = out.router_probs[0, 0].detach()
        with torch.no_grad():  # without labels every text token counts as prompt, the answer's too
            unlabelled[answer] = sample_model(input_ids=ids, **pixels).router_probs[0, 0]
    torch.testing.assert_close(probs[low], probs[high])
    assert not torch.allclose(unlabelled[low], unlabelled[high])
    out.loss.backward()
    assert sample_model.model.router.weight.grad.abs().sum() > 0


def test_generate_routes_with_the_prompt(sample_model, tiny_config):
    low, high = prompt_steered(sample_model, tiny_config)
    rows = []
    sample_model.model.experts["detection"].register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    pixels = random_pixels(tiny_config, 2)
    ids = torch.tensor([prompt_ids(tiny_config, [low] * 3), prompt_ids(tiny_config, [high] * 3)])
    with torch.no_grad():
        generated = sample_model.generate(input_ids=ids, **pixels, max_new_tokens=3, do_sample=False)
        direct = sample_model(input_ids=ids, **pixels).logits[:, -1].argmax(-1)
    # detection ran on the one image whose prompt chose it, in generate and in forward; without the prompt
    # (a zero prompt) it would run on none
    assert rows == [1, 1]
    assert generated.shape == (2, ids.shape[1] + 3)
    assert torch.equal(generated[:, ids.shape[1]], direct)


def test_mismatched_inputs_are_clear_errors_and_compile_is_refused(sample_model, tiny_config):
    pixels = random_pixels(tiny_config, 2)
    pixels["segmentation_pixel_values"] = pixels["segmentation_pixel_values"][:1]
    with pytest.raises(ValueError, match="same images"):
        sample_model.model.get_image_features(**pixels)
    ids = torch.tensor([prompt_ids(tiny_config, [5], num_images=2)])
    with pytest.raises(ValueError, match="2 images' worth of image tokens but 1 images"):
        sample_model(input_ids=ids, **random_pixels(tiny_config, 1))
    with pytest.raises(ValueError, match="router_mode='sample' does not use it"):
        sample_model.model.compile_fusion()


def test_a_skipped_expert_still_joins_the_backward_pass(sample_model, tiny_config):
    sample_model.train()
    steer_router(sample_model, [2.0, 1.0, 0.5, -3.0])
    ids = torch.tensor([prompt_ids(tiny_config, [5, 6])])
    labels = ids.masked_fill(ids == tiny_config.image_token_id, -100)
    sample_model(input_ids=ids, labels=labels, **random_pixels(tiny_config, 1)).loss.backward()
    adapter = sample_model.model.adapters["segmentation"]
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in adapter.parameters())  # zero, but present
