"""Each metric against cases computed by hand."""

import math

import pytest
import torch

from astrea.evaluation.metrics import (
    anls,
    box_iou,
    caption_scores,
    exact_match,
    extract_option,
    grounding_accuracy,
    mme_scores,
    multiple_choice_accuracy,
    normalize_answer,
    parse_boxes,
    relaxed_accuracy,
    retrieval_recall,
    vqa_accuracy,
    yes_no,
)


def test_answer_normalisation_and_exact_match():
    assert normalize_answer("The Two red circles!") == "2 red circles"
    assert normalize_answer("3.5 kg.") == "3.5 kg"
    assert exact_match(" A circle.", "circle") == 1.0 and exact_match("circles", "circle") == 0.0


def test_vqa_soft_accuracy_over_ten_annotators():
    # "2" given by 2 of 10 humans: leaving out one of those two -> 1/3 (2 subsets), others -> 2/3 (8 subsets)
    answers = ["2", "two", "3", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("2", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("3", answers) == 1.0  # 8 humans: at least 7 in every subset
    assert vqa_accuracy("4", answers) == 0.0
    assert vqa_accuracy("Yes.", ["yes"]) == 1.0
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("x", [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("(C) a blue square", "C"),
        ("A. red", "A"),
        ("The answer is d", "D"),
        ("I think it is B, the square", "B"),
        ("a blue square", "C"),  # the option's own text
        ("red circle", "B"),  # "red circle" holds option A's "circle": the longer one wins
        ("maybe A or B", None),  # two letters: no pick
        ("a purple star", None),
    ],
)
def test_option_extraction(text, expected):
    assert extract_option(text, ["circle", "red circle", "blue square", "green"]) == expected


def test_multiple_choice_accuracy_counts_unparsed_answers_as_wrong():
    options = [["yes", "no"], ["cat", "dog", "bird"], ["1", "2"]]
    assert multiple_choice_accuracy(["A", "it is a dog", "hmm"], options, ["A", "B", "B"]) == pytest.approx(2 / 3)


def test_mme_acc_and_acc_plus():
    assert yes_no("Yes, it is.") == "yes" and yes_no("No") == "no" and yes_no("Maybe") is None
    scores = mme_scores(["i1", "i1", "i2", "i2"], ["yes", "no", "yes", "yes"], ["yes", "no", "yes", "no"])
    assert scores == {"acc": 0.75, "acc_plus": 0.5}


def test_relaxed_accuracy():
    assert relaxed_accuracy("104", "100") == 1.0 and relaxed_accuracy("106", "100") == 0.0
    assert relaxed_accuracy("12%", "12.5") == 1.0  # 4% off
    assert relaxed_accuracy("1,000", "1000") == 1.0
    assert relaxed_accuracy("Spain", "spain") == 1.0 and relaxed_accuracy("France", "Spain") == 0.0
    assert relaxed_accuracy("0", "0") == 1.0 and relaxed_accuracy("0.01", "0") == 0.0


def test_anls():
    assert anls("hello", ["hello"]) == 1.0
    assert anls("hellp", ["hello", "bye"]) == pytest.approx(1 - 1 / 5)  # one substitution in five characters
    assert anls("abc", ["xyz"]) == 0.0  # distance 1.0 >= 0.5
    assert anls("Hello  World", ["hello world"]) == 1.0


def test_caption_scores_against_hand_computed_bleu():
    refs = {"a": ["a red circle"], "b": ["two blue squares"]}
    perfect = caption_scores({"a": "A red circle.", "b": "two blue squares"}, refs)
    # three-word sentences have no 4-grams: COCO's scorer smooths the empty 4-gram precision to 1e-15 / 1e-9, so
    # BLEU-4 = (1 * 1 * 1 * 1e-6) ** (1/4)
    assert perfect["bleu4"] == pytest.approx(1e-6**0.25, rel=1e-3)
    four = {"a": ["a small red circle here"], "b": ["two large blue squares there"]}
    same = caption_scores({"a": "a small red circle here", "b": "two large blue squares there"}, four)
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6)
    # CIDEr-D: identical captions in a two-image corpus, every n-gram unique to its image -> 10 (the x10 scale)
    assert same["cider"] == pytest.approx(10.0, rel=1e-6)
    worse = caption_scores({"a": "a small blue circle here", "b": "two large blue squares there"}, four)
    assert worse["bleu4"] < same["bleu4"] and worse["cider"] < same["cider"]
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({"a": "x"}, refs)


def test_boxes_from_text_and_grounding_accuracy():
    text = "red circle [0.10, 0.20, 0.30, 0.40]; blue square [0.5, 0.5, 0.9, 0.9]."
    assert parse_boxes(text) == [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9]]
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    targets = [[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]
    predictions = [text, "it is at [0.0, 0.0, 0.5, 0.4]", "no box here"]  # IoU 1.0, 0.8, none
    assert grounding_accuracy(predictions, targets) == pytest.approx(2 / 3)


def test_retrieval_recall_both_ways():
    # 3 images, 4 texts; texts 0,1 belong to image 0, text 2 to image 1, text 3 to image 2
    similarity = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.0],  # image 0: best text 1 (correct) -> rank 0
            [0.8, 0.0, 0.7, 0.1],  # image 1: text 0 first, then text 2 (correct) -> rank 1
            [0.9, 0.5, 0.6, 0.0],  # image 2: its text 3 comes last -> rank 3
        ]
    )
    recall = retrieval_recall(similarity, [0, 0, 1, 2], ks=(1, 2, 5))
    assert recall["i2t_r@1"] == pytest.approx(1 / 3) and recall["i2t_r@2"] == pytest.approx(2 / 3)
    assert recall["i2t_r@5"] == 1.0
    # text 0: images by score 2 (0.9), 1 (0.8), 0 (0.1) -> rank 2; text 1: image 0 first; text 2: image 1 first;
    # text 3: image 1 (0.1), then 0 and 2 tied at 0.0 -> rank 1 or 2
    assert recall["t2i_r@1"] == pytest.approx(2 / 4)
    assert recall["t2i_r@5"] == 1.0
    assert not math.isnan(recall["t2i_r@2"])
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_recall(similarity, [0, 1, 5, 0])
    with pytest.raises(ValueError, match="every image needs at least one text"):
        retrieval_recall(similarity, [0, 0, 1, 1])


def test_a_text_that_several_images_share_is_right_for_each_of_them():
    # images 0 and 1 share caption text 0; image 2 owns text 1. Image 1 ranks text 0 first: a hit, not a miss.
    similarity = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    recall = retrieval_recall(similarity, [[0, 1], 2], ks=(1,))
    assert recall == {"i2t_r@1": 1.0, "t2i_r@1": 1.0}
    with pytest.raises(ValueError, match="every image needs at least one text"):
        retrieval_recall(similarity, [0, 2], ks=(1,))
