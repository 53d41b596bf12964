"""Router, adapters and the mixture of Eq. 9-10, and the random residual attention of Eq. 2-4."""

import pytest
import torch
from astrea_testing import random_pixels

from modeling_astrea import EXPERT_NAMES, AstreaConfig, AstreaForConditionalGeneration
from modeling_astrea.modeling_astrea import AstreaResidualAttention, load_balancing_loss, top_k_router_probs


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_top_k_masks_exactly_the_others_and_sums_to_one(top_k):
    logits = torch.randn(5, 7, 4)
    probs = top_k_router_probs(logits, top_k)
    assert ((probs == 0).sum(-1) == 4 - top_k).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, 7))
    kept = probs > 0  # the kept experts are the k largest logits
    smallest_kept = logits.masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = logits.masked_fill(kept, float("-inf")).amax(-1)
    assert (smallest_kept > largest_dropped).all()
    # Eq. 9 over the kept logits only
    expected = torch.where(kept, logits.exp(), torch.zeros(())) / torch.where(kept, logits.exp(), 0).sum(-1, True)
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("top_k", [1, 3])
def test_fused_tokens_are_the_routed_sum_of_adapted_projections(tiny_config, top_k):
    config = AstreaConfig.from_dict({**tiny_config.to_dict(), "router_top_k": top_k})
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config).model.eval()
    for adapter in model.adapters.values():  # leave the identity start so the adapters matter
        torch.nn.init.normal_(adapter.up.weight, std=0.1)
    features = model.get_expert_features(**random_pixels(config, 2))
    output = model.fuse_expert_features(features)
    projected = [model.projectors[n](features[n]) for n in EXPERT_NAMES]
    probs = top_k_router_probs(model.router(torch.cat(projected, -1)), top_k)
    expected = sum(probs[..., i, None] * model.adapters[n](projected[i]) for i, n in enumerate(EXPERT_NAMES))
    assert output.pooler_output.shape == (2, config.num_image_tokens, config.text_config.hidden_size)
    assert output.router_probs.shape == (2, config.num_image_tokens, 4)
    assert ((output.router_probs == 0).sum(-1) == 4 - top_k).all()
    torch.testing.assert_close(output.pooler_output, expected)


def test_adapters_start_as_identity(tiny_model):
    x = torch.randn(3, 5, tiny_model.config.text_config.hidden_size)
    for adapter in tiny_model.model.adapters.values():
        torch.testing.assert_close(adapter(x), x)


def test_router_probabilities_per_image_are_in_the_output(tiny_model, tiny_config):
    ids = torch.tensor([[1] + [tiny_config.image_token_id] * tiny_config.num_image_tokens * 2 + [40, 41]])
    output = tiny_model(input_ids=ids, **random_pixels(tiny_config, 2))
    assert output.router_probs.shape == (2, tiny_config.num_image_tokens, 4)
    torch.testing.assert_close(output.router_probs.sum(-1), torch.ones(2, tiny_config.num_image_tokens))


class TestLoadBalancing:
    def test_even_use_scores_one_and_one_chosen_set_scores_its_probability_mass(self):
        # four tokens, each dropping a different expert: every expert fills 3 of the 12 places
        logits = torch.full((4, 4), 2.0).fill_diagonal_(-1.0)
        torch.testing.assert_close(load_balancing_loss(logits, 3), torch.tensor(1.0))
        # every token keeps experts 0, 1, 3 (f = 1/3 each): E * (P_0 + P_1 + P_3) / 3 = 4/3 * (1 - P_2)
        logits = torch.tensor([[1.0, 0.5, -2.0, 0.2], [0.3, 2.0, -1.0, 1.0]])
        probability = logits.softmax(-1).mean(0)
        expected = 4 / 3 * (1 - probability[2])
        torch.testing.assert_close(load_balancing_loss(logits[None], 3), expected)

    def test_an_expert_outside_every_top_k_is_pulled_back(self):
        logits = torch.tensor([[1.0, 0.5, -2.0, 0.2], [0.3, 2.0, -1.0, 1.0]], requires_grad=True)
        load_balancing_loss(logits, 3).backward()
        assert (logits.grad[:, 2] < 0).all()  # a step of descent raises the dropped expert's logit
        logits.grad = None  # while through Eq. 9 alone it gets no gradient at all
        (top_k_router_probs(logits, 3) * torch.randn(2, 4)).sum().backward()
        assert (logits.grad[:, 2] == 0).all() and (logits.grad[:, [0, 1, 3]] != 0).all()

    @pytest.mark.parametrize("mode", ["token", "sample"])
    def test_training_loss_adds_the_weighted_term_and_reports_it(self, tiny_config, mode):
        ids = torch.tensor([[1] + [tiny_config.image_token_id] * tiny_config.num_image_tokens + [40, 41, 42]])
        labels = ids.clone().masked_fill(ids == tiny_config.image_token_id, -100)
        pixels = random_pixels(tiny_config, 1)
        losses = {}
        for coefficient in (0.0, 0.5):
            config = AstreaConfig.from_dict(
                {**tiny_config.to_dict(), "router_aux_loss_coef": coefficient, "use_moco": False, "router_mode": mode}
            )
            torch.manual_seed(0)
            model = AstreaForConditionalGeneration(config).eval()
            losses[coefficient] = model(input_ids=ids, labels=labels, **pixels)
        assert losses[0.0].loss_balance is None
        balance = losses[0.5].loss_balance
        torch.testing.assert_close(balance, load_balancing_loss(losses[0.5].router_logits, tiny_config.router_top_k))
        torch.testing.assert_close(losses[0.5].loss, losses[0.0].loss + 0.5 * balance)
        rows = tiny_config.num_image_tokens if mode == "token" else 1  # one routing per image in sample mode
        assert losses[0.5].router_logits.shape == (1, rows, 4)

    def test_a_negative_coefficient_is_refused(self, tiny_config):
        with pytest.raises(ValueError, match="router_aux_loss_coef"):
            AstreaConfig.from_dict({**tiny_config.to_dict(), "router_aux_loss_coef": -0.1})


class TestResidualAttention:
    def make(self, prob=0.5, gamma=1.0):
        torch.manual_seed(0)
        return AstreaResidualAttention(8, gamma=gamma, prob=prob)

    def test_first_stage_and_closed_gates_leave_features_unchanged(self):
        module = self.make()
        features = torch.randn(2, 5, 8)
        torch.testing.assert_close(module(features, None), features)
        cached = torch.randn(2, 3, 5, 8)
        torch.testing.assert_close(module(features, cached, gates=torch.zeros(2, 3)), features)

    def test_matches_equations_2_to_4(self):
        module = self.make(gamma=0.5).eval()  # evaluation: every gate open
        features, cached = torch.randn(2, 5, 8), torch.randn(2, 2, 5, 8)
        query = module.query(0.5 * (cached[:, 0] + cached[:, 1]))
        key, value = module.key(features), module.value(features)
        attention = (query @ key.transpose(1, 2) / 8**0.5).softmax(-1)
        torch.testing.assert_close(module(features, cached), features + attention @ value)

    def test_gates_are_per_sample(self):
        module = self.make()
        features, cached = torch.randn(2, 5, 8), torch.randn(2, 1, 5, 8)
        out = module(features, cached, gates=torch.tensor([[1.0], [0.0]]))
        torch.testing.assert_close(out[1], features[1])
        assert not torch.allclose(out[0], features[0])

    def test_training_gates_are_bernoulli_p(self):
        module = self.make(prob=0.3).train()
        gates = module.sample_gates(20000, 3, "cpu")
        assert set(gates.unique().tolist()) <= {0.0, 1.0}
        assert gates.mean().item() == pytest.approx(0.3, abs=0.01)
        assert module.eval().sample_gates(4, 3, "cpu").eq(1).all()


def test_compiled_fusion_matches_eager(tiny_model, tiny_config):
    with torch.no_grad():
        features = tiny_model.model.get_expert_features(**random_pixels(tiny_config, 2))
        eager = tiny_model.model.fuse_expert_features(features)
        tiny_model.model.compile_fusion()
        compiled = tiny_model.model.fuse_expert_features(features)
    assert "fuse_expert_features" in vars(tiny_model.model)  # the compiled function shadows the method
    torch.testing.assert_close(compiled.pooler_output, eager.pooler_output, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(compiled.router_probs, eager.router_probs)
