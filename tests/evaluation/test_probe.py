"""The feature probe (`astrea-eval probe`): linear probes that find a column where the features hold one and stay
near chance where they do not, on each expert's features and on the visual tokens, and the variance shares beside
them."""

import pytest
import torch

from astrea.evaluation.cli import main as astrea_eval
from astrea.evaluation.probe import (
    column_scores,
    feature_probe,
    left_right_agreement,
    left_right_rows,
    variance_share,
)
from modeling_astrea import AstreaForConditionalGeneration


def test_the_probe_reads_a_column_that_is_there_and_not_one_that_is_not():
    generator = torch.Generator().manual_seed(0)
    columns = torch.randint(0, 8, (2000,), generator=generator)
    noise = torch.randn(2000, 32, generator=generator)
    train = torch.arange(2000) < 1600
    with_column = noise.clone()
    with_column[:, :8] += 6 * torch.nn.functional.one_hot(columns, 8)
    found = column_scores(with_column, columns, train, 8)
    assert found["column"] > 0.97 and found["half"] > 0.98
    blind = column_scores(noise, columns, train, 8)
    assert blind["column"] < 0.2 and blind["half"] < 0.6  # chance: 0.125 and 0.5


def test_the_variance_share_is_what_the_class_means_explain():
    labels = torch.tensor([0, 0, 1, 1])
    # class means -1 and 1 and spread 0.5 around them: between 4 * 1, total 4 * (1 + 0.25)
    features = torch.tensor([[-1.5], [-0.5], [0.5], [1.5]])
    assert abs(variance_share(features, labels) - 1 / 1.25) < 1e-6
    assert variance_share(features, torch.tensor([0, 1, 0, 1])) < 0.25  # labels that do not follow the features
    assert variance_share(torch.ones(4, 3), labels) == 0.0  # no variance at all


@pytest.mark.parametrize("order", ["row", "column"])
def test_the_visual_tokens_carry_a_strong_position_embedding(tiny_config, order):
    tiny_config.image_position_embedding = True
    tiny_config.image_token_order = order  # the probe reads column-ordered tokens back in the raster
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(tiny_config).eval()
    with torch.no_grad():
        model.model.image_position.column.normal_(std=50.0)  # far louder than the random experts' features
    from astrea_testing import TINY
    from transformers import AutoProcessor

    result = feature_probe(model, AutoProcessor.from_pretrained(TINY), num_images=60, batch_size=30)
    assert set(result["features"]) == {"caption", "classification", "detection", "segmentation", "visual tokens"}
    tokens = result["features"]["visual tokens"]
    assert tokens["half"] > 0.95
    # the loud column embedding is nearly all of the tokens' variance: shape and colour explain little of it
    assert tokens["shape_share"] < 0.2 and tokens["colour_share"] < 0.2
    assert result["chance"]["column"] == round(1 / tiny_config.image_grid_size, 3) and result["chance"]["half"] == 0.5
    assert result["chance"]["shape"] == 0.2 and abs(result["chance"]["colour"] - 1 / 6) < 1e-3
    assert result["objects"] >= 60


def test_astrea_eval_probe_prints_a_table_and_checks_its_arguments(tiny_folder, capsys):
    assert astrea_eval(["probe", "--model", str(tiny_folder), "--num-images", "20", "--question-images", "0"]) == 0
    out = capsys.readouterr().out
    assert "| visual tokens |" in out and "| (chance) |" in out and "variance: shape" in out
    assert "left/right question" not in out  # --question-images 0: no questions asked
    assert astrea_eval(["probe", "--model", str(tiny_folder), "--num-images", "5"]) == 2
    assert "--num-images must be at least 10" in capsys.readouterr().err
    assert astrea_eval(["probe", "--model", str(tiny_folder), "--question-images", "-1"]) == 2
    assert "--question-images must be 0 or more, got -1" in capsys.readouterr().err


def test_astrea_eval_probe_asks_the_left_right_questions(tiny_folder, capsys):
    args = ["probe", "--model", str(tiny_folder), "--num-images", "10", "--question-images", "12"]
    assert astrea_eval(args) == 0
    out = capsys.readouterr().out
    assert "| left/right question | n | right |" in out and "same answer both ways round" in out
    assert "| side |" in out and "| position |" in out


def test_left_right_rows_name_the_sides_of_the_objects_the_question_names():
    rows = left_right_rows(num_images=40, seed=5)
    assert {row["type"] for row in rows} == {"side", "position"}
    for row in rows:
        first, second = row["named"]
        assert row["question"].startswith(f"Is the {first} ")
        if row["type"] == "side":
            assert second is None and row["second"] is None and row["answer"] == row["first"]
        else:
            assert row["question"].endswith(f" of the {second}?")
            if row["first"] != row["second"]:  # in different halves the asked object's side is the answer
                assert row["answer"] == row["first"]
    # every position pair is asked both ways round
    asked = {(row["image_index"], *row["named"]) for row in rows if row["type"] == "position"}
    assert asked and all((image, second, first) in asked for image, first, second in asked)


def test_left_right_agreement_tells_a_comparing_model_from_one_that_ignores_the_order():
    rows = left_right_rows(num_images=60, seed=6)
    position = [row for row in rows if row["type"] == "position"]
    apart = [row for row in position if row["first"] != row["second"]]
    assert apart
    # the answers of a model that compares the two objects
    right = left_right_agreement(rows, {row["id"]: row["answer"] for row in rows})
    assert right["position"]["accuracy"] == right["side"]["accuracy"] == 1.0
    assert right["position"]["same_both_ways"] == 0.0
    # one that reads the second-named object: right only where both lie in the same half
    second = left_right_agreement(rows, {row["id"]: row["second"] or row["first"] for row in rows})
    assert second["position"]["second"] == 1.0 and second["position"]["same_both_ways"] == 0.0
    same_half = sum(row["answer"] == row["second"] for row in position)
    assert second["position"]["accuracy"] == round(same_half / len(position), 3)
    # one that always says "left" (with a full stop and a capital): the same answer both ways round, every time
    left = left_right_agreement(rows, {row["id"]: "Left." for row in rows})
    assert left["position"]["left"] == 1.0 and left["position"]["same_both_ways"] == 1.0
    assert left["side"]["accuracy"] == round(
        sum(row["answer"] == "left" for row in rows if row["type"] == "side")
        / sum(row["type"] == "side" for row in rows),
        3,
    )
    by_count = sum(left[f"position, {n} objects"]["n"] for n in (2, 3))
    assert by_count == len(position) and left["side"]["second"] is None


@pytest.mark.parametrize("unseen", [False, True])
def test_the_synthetic_benchmark_can_be_drawn_in_the_unseen_renderer(tmp_path, unseen):
    args = ["synthetic", "--output", str(tmp_path), "--num-images", "4"] + ["--unseen-renderer"] * unseen
    assert astrea_eval(args) == 0
    from astrea.training.data import build_dataset

    split = "unseen" if unseen else "test"
    expected = build_dataset(0, 0 if unseen else 4, seed=0, num_unseen=4 if unseen else 0)[split]
    assert (tmp_path / "images" / "00000.png").read_bytes() != b""
    from PIL import Image

    drawn = Image.open(tmp_path / "images" / "00000.png").convert("RGB")
    assert list(drawn.getdata()) == list(expected[0]["image"].convert("RGB").getdata())
