"""The synthetic data set, the recipe file and the feature cache."""

import json
import pickle

import numpy as np
import pytest
import torch
from astrea_testing import REPO
from PIL import Image

from astrea.processing import AstreaImageProcessor
from astrea.training.collator import stage_target
from astrea.training.data import (
    COLOURS,
    QUESTION_TYPES,
    STYLES,
    UNSEEN_STYLE,
    build_dataset,
    run_length_decode,
    run_length_encode,
)
from astrea.training.feature_cache import FeatureCache, expert_fingerprint, image_key
from astrea.training.recipe import Recipe, deep_merge


@pytest.fixture(scope="module")
def data():
    return build_dataset(num_train=24, num_test=8, image_size=64, seed=3)


def test_dataset_rows_are_consistent(data):
    assert len(data["train"]) == 24 and len(data["test"]) == 8
    for row in data["train"]:
        n = len(row["labels"])
        assert 1 <= n <= 3 and len(row["boxes"]) == n and len(row["masks"]) == n
        assert row["image"].size == (64, 64)
        answers = {q["type"]: q["answer"] for q in row["questions"]}
        assert answers["count"] == ["one", "two", "three"][n - 1]
        assert {q["type"] for q in row["questions"]} <= set(QUESTION_TYPES)
        for label, box, mask in zip(row["labels"], row["boxes"], row["masks"], strict=True):
            colour, shape = label.split()
            assert colour in row["tags"] and shape in row["tags"]
            ys, xs = np.nonzero(run_length_decode(mask, 64))
            # the mask lies in its box (boxes are stored to 3 decimals: 0.064 pixels here)
            assert box[0] * 64 - 1.1 <= xs.min() and xs.max() <= box[2] * 64 + 1.1


def test_the_classic_renderer_draws_what_the_renderer_before_render_style_drew():
    """Seed for seed (checked against the renderer of 5bde0fe): a style setting that does not vary draws no random
    number, so earlier runs and the demo's held-out images stay comparable."""
    captions = build_dataset(num_train=3, num_test=0, seed=0)["train"]["caption"]
    assert captions == [
        "A large blue cross and a medium red square.",
        "A large orange diamond and a medium purple circle.",
        "A large purple triangle.",
    ]


def test_side_questions_name_the_half_each_object_is_in(data):
    """Training images ask the side of each object (when the descriptions are unambiguous and the side is clear),
    held-out ones of one object; the answer is the half of the image the object's mask centre lies in."""
    asked_per_split = {}
    for split in ("train", "test"):
        for row in data[split]:
            asked = [q for q in row["questions"] if q["type"] == "side"]
            asked_per_split.setdefault(split, []).append(len(asked))
            if len(set(row["labels"])) < len(row["labels"]):
                assert not asked
            centres = {
                label: np.nonzero(run_length_decode(runs, 64))[1].mean() / 64
                for label, runs in zip(row["labels"], row["masks"], strict=True)
            }
            for q in asked:
                label = q["question"].removeprefix("Is the ").removesuffix(" on the left or the right?")
                assert abs(centres[label] - 0.5) > 0.09  # a clear side only
                assert q["answer"] == ("left" if centres[label] < 0.5 else "right")
    assert max(asked_per_split["test"]) == 1 and max(asked_per_split["train"]) > 1
    assert sum(asked_per_split["train"]) > len(data["train"]) / 2


def test_position_questions_are_asked_both_ways_in_training_and_agree_with_the_boxes(data):
    """A training image asks its pair both ways round, with opposite answers; a held-out one asks once. Every answer
    follows the two objects' mask centres."""
    both_ways = 0
    for split, per_image in (("train", 2), ("test", 1)):
        for row in data[split]:
            asked = [q for q in row["questions"] if q["type"] == "position"]
            assert len(asked) in (0, per_image)
            centres = {
                label: np.nonzero(run_length_decode(runs, 64))[1].mean()
                for label, runs in zip(row["labels"], row["masks"], strict=True)
            }
            for q in asked:
                first, second = q["question"].removeprefix("Is the ").removesuffix("?").split(" left or right of the ")
                assert q["answer"] == ("left" if centres[first] < centres[second] else "right")
            if len(asked) == 2:
                assert asked[0]["question"] != asked[1]["question"] and asked[0]["answer"] != asked[1]["answer"]
                both_ways += 1
    assert both_ways > 0


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    grown = torch.nn.functional.max_pool2d(torch.tensor(mask, dtype=torch.float32)[None], 2 * pixels + 1, 1, pixels)
    return grown[0].numpy() > 0


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ~dilate(~mask, pixels)


def object_and_background_colours(row) -> tuple[list[np.ndarray], np.ndarray]:
    """The median RGB well inside each object's mask, and the mean RGB well away from every object."""
    pixels = np.asarray(row["image"], dtype=np.float32)
    masks = [run_length_decode(runs, 64) for runs in row["masks"]]
    inner = [erode(mask, 3) for mask in masks]
    anywhere = dilate(np.any(masks, axis=0), 3)
    return [np.median(pixels[m], axis=0) for m in inner if m.sum() >= 4], pixels[~anywhere].mean(axis=0)


@pytest.mark.parametrize("style", ["classic", "broad", "unseen"])
def test_each_objects_pixels_have_its_named_colour(style):
    """Under every renderer (the broad and the unseen one jitter fills, draw outlines, resample canvases) each
    object's inside is still nearest to its own colour of the six."""
    if style == "unseen":
        rows = build_dataset(num_train=0, num_test=0, seed=5, num_unseen=60)["unseen"]
    else:
        rows = build_dataset(num_train=60, num_test=0, seed=5, style=style)["train"]
    names, palette = list(COLOURS), np.array(list(COLOURS.values()), dtype=np.float32)
    checked = 0
    for row in rows:
        inside, _ = object_and_background_colours(row)
        drawn = [
            label.split()[0]
            for label, runs in zip(row["labels"], row["masks"], strict=True)
            if erode(run_length_decode(runs, 64), 3).sum() >= 4
        ]
        for colour, name in zip(inside, drawn, strict=True):
            assert names[int(np.abs(palette - colour).sum(-1).argmin())] == name
            checked += 1
    assert checked > 60


def test_the_unseen_renderer_split_is_drawn_outside_the_training_settings():
    """Its settings lie outside the ranges of both training renderers, and its images show it: every unseen
    background is darker than every training one; its questions are the usual ones."""
    for style in STYLES.values():
        for field in ("brightness", "canvas"):
            low, high = getattr(UNSEEN_STYLE, field)
            train_low, train_high = getattr(style, field)
            assert high < train_low or low > train_high, field
        assert not set(UNSEEN_STYLE.backgrounds) & set(style.backgrounds)
        assert style.outline == 0 or UNSEEN_STYLE.outline_colour != style.outline_colour
    for style in STYLES:
        data = build_dataset(num_train=40, num_test=0, seed=2, num_unseen=40, style=style)
        brightness = {
            split: [object_and_background_colours(row)[1].mean() for row in data[split]]
            for split in ("train", "unseen")
        }
        assert max(brightness["unseen"]) < min(brightness["train"]), style
    assert {q["type"] for row in data["unseen"] for q in row["questions"]} == set(QUESTION_TYPES)
    assert "unseen" not in build_dataset(num_train=2, num_test=2)  # only when asked for


def test_dataset_is_deterministic_and_splits_differ(data):
    again = build_dataset(num_train=24, num_test=8, image_size=64, seed=3)
    assert again["train"]["caption"] == data["train"]["caption"]
    train_images = {image_key(image) for image in data["train"]["image"]}
    assert train_images.isdisjoint(image_key(image) for image in data["test"]["image"])


def test_training_questions_ask_about_every_object_and_test_questions_about_one(data):
    one = build_dataset(num_train=24, num_test=8, image_size=64, seed=3, every_object=False)
    assert one["train"]["caption"] == data["train"]["caption"]  # the same images and objects either way
    assert one["test"]["questions"] == data["test"]["questions"]
    for every, single in zip(data["train"], one["train"], strict=True):
        shapes = [label.split()[1] for label in every["labels"]]
        asked = sorted(q["question"] for q in every["questions"] if q["type"] == "colour")
        assert asked == sorted(f"What colour is the {s}?" for s in shapes if shapes.count(s) == 1)
        assert sum(q["type"] == "colour" for q in single["questions"]) <= 1
        assert {q["question"] for q in single["questions"]} <= {q["question"] for q in every["questions"]}
    for row in data["test"]:
        assert sum(q["type"] == "colour" for q in row["questions"]) <= 1


def test_run_length_round_trip():
    mask = np.random.default_rng(0).random((16, 16)) > 0.6
    assert (run_length_decode(run_length_encode(mask), 16) == mask).all()


def test_stage_targets_are_cumulative(data):
    row = data["train"][0]
    prompts, targets = zip(
        *(
            stage_target(row, stages, 64)
            for stages in (
                ["caption"],
                ["caption", "classification"],
                ["caption", "classification", "detection"],
                ["caption", "classification", "detection", "segmentation"],
            )
        ),
        strict=True,
    )
    assert prompts == ("caption", "caption, tags", "caption, tags, boxes", "caption, tags, boxes, regions")
    for shorter, longer in zip(targets, targets[1:], strict=False):
        assert longer.startswith(shorter)
    assert "Boxes:" in targets[2] and "Regions:" in targets[3] and "covers" in targets[3]


def test_recipe_rejects_unknown_keys_and_stages(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("prealign:\n  stage_stepz: [1]\n")
    with pytest.raises(ValueError, match=r"unknown key 'prealign.stage_stepz'"):
        Recipe.from_yaml(path)
    path.write_text("prealign:\n  order: [caption, ocr]\n  stage_steps: [1, 1]\n")
    with pytest.raises(ValueError, match="unknown stage 'ocr'"):
        Recipe.from_yaml(path)
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        Recipe.from_yaml(path)
    with pytest.raises(ValueError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "absent.yaml")
    path.write_text("expert_pretraining:\n  colour_experts: [caption, ocr]\n")
    with pytest.raises(ValueError, match="unknown expert 'ocr' in expert_pretraining.colour_experts"):
        Recipe.from_yaml(path)
    path.write_text("data:\n  style: cartoon\n")
    with pytest.raises(ValueError, match="data.style is 'cartoon'; use broad or classic"):
        Recipe.from_yaml(path)
    path.write_text("data:\n  num_unseen: 10\n")
    with pytest.raises(ValueError, match="data.num_unseen is evaluated from the files data.files writes"):
        Recipe.from_yaml(path)


def test_a_recipe_can_extend_another(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 3\ninstruct:\n  steps: 7\n  learning_rate: 0.5\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ninstruct:\n  steps: 9\n")
    recipe = Recipe.from_yaml(tmp_path / "child.yaml")
    assert (recipe.seed, recipe.instruct.steps, recipe.instruct.learning_rate) == (3, 9, 0.5)
    (tmp_path / "base.yaml").write_text("extends: child.yaml\n")
    with pytest.raises(ValueError, match="extends itself"):
        Recipe.from_yaml(tmp_path / "child.yaml")
    (tmp_path / "child.yaml").write_text("extends: absent.yaml\n")
    with pytest.raises(ValueError, match="absent.yaml does not exist"):
        Recipe.from_yaml(tmp_path / "child.yaml")
    sample = Recipe.from_yaml("training/recipes/tiny-sample-routing.yaml")
    assert sample.model.overrides["router_mode"] == "sample"
    assert (
        sample.model.overrides["image_grid_size"]
        == Recipe.from_yaml("training/recipes/tiny.yaml").model.overrides["image_grid_size"]
    )


def test_shipped_recipes_load():
    shipped = sorted((REPO / "training" / "recipes").glob("*.yaml"))
    assert {p.stem for p in shipped} >= {"tiny", "ablation", "ablation-quick", "astrea-13b", "astrea-34b"}
    for path in shipped:
        recipe = Recipe.from_yaml(path)
        assert recipe.prealign.order == ["caption", "classification", "detection", "segmentation"], path
    quick, full = (
        Recipe.from_yaml("training/recipes/ablation-quick.yaml"),
        Recipe.from_yaml("training/recipes/ablation.yaml"),
    )
    assert quick.model.text_overrides["head_dim"] == full.model.text_overrides["head_dim"] == 8  # the tables' LLM
    assert quick.instruct.tasks == full.instruct.tasks == ["questions", "caption", "grounding"]
    assert quick.instruct.steps < full.instruct.steps and len(quick.ablation.seeds) < len(full.ablation.seeds)
    from astrea.training.ablation import variants

    for recipe in (quick, full):  # every variant of Tables 3, 4 and 6 is a valid recipe
        for variant in variants(recipe):
            merged = Recipe.from_dict(deep_merge(recipe.to_dict(), variant.overrides))
            assert merged.output_dir == recipe.output_dir, variant.name
    paper = Recipe.from_yaml("training/recipes/astrea-13b.yaml")
    assert paper.prealign.stage_steps == [2000000, 500000, 200000, 200000]
    assert (paper.instruct.adam_beta2, paper.instruct.weight_decay, paper.instruct.warmup_ratio) == (0.98, 0.05, 0.15)
    assert paper.instruct.batch_size * paper.instruct.gradient_accumulation_steps * 8 == 128


@pytest.fixture
def cache_setup(tiny_model, tiny_config, tmp_path):
    processor = AstreaImageProcessor.from_model_config(tiny_config, detection_size=64)
    return FeatureCache.for_model(tmp_path / "cache", tiny_model, processor), tiny_model, processor


def test_cache_fills_once_and_matches_the_experts(cache_setup):
    cache, model, processor = cache_setup
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "green", "blue")]
    stats = cache.fill(model, processor, images + images[:1])  # a repeated image is computed once
    assert stats["misses"] == 3 * 4 and stats["hits"] == 0
    calls = []
    model.model.experts["caption"].register_forward_hook(lambda *a: calls.append(1))
    stats = cache.fill(model, processor, images)
    assert calls == [] and stats["hits"] == 3 * 4  # a second pass runs no expert
    loaded = cache.load([image_key(i) for i in images])
    direct = model.model.get_expert_features(
        **{k: v for k, v in processor(images, return_tensors="pt").items() if k != "num_tiles"}
    )
    for name in loaded:  # stored in half precision, handed back in the experts' own dtype
        assert loaded[name].dtype == direct[name].dtype == torch.float32
        torch.testing.assert_close(loaded[name], direct[name].half().float(), atol=0, rtol=0)
    # and a float32 cache keeps them exactly
    exact = FeatureCache.for_model(cache.root.with_name("exact"), model, processor, dtype="float32")
    exact.fill(model, processor, images)
    for name, feature in exact.load([image_key(i) for i in images]).items():
        torch.testing.assert_close(feature, direct[name], atol=0, rtol=0)


def test_entries_go_into_shards_with_an_index_and_another_cache_reads_them(cache_setup):
    """Rows go into one flat file per shard; a shard closes at shard_mb and the next begins. A second cache on the
    same folder (another process, a later run) finds every entry through the indexes, and a process's `refresh`
    sees shards written after it opened."""
    _, model, processor = cache_setup
    images = [Image.new("RGB", (24, 24), (25 * i, 90, 255 - 25 * i)) for i in range(5)]
    keys = [image_key(i) for i in images]
    root = cache_setup[0].root.with_name("sharded")
    reader = FeatureCache.for_model(root, model, processor)  # opened before anything is written
    writer = FeatureCache.for_model(root, model, processor, shard_mb=1e-6)  # every row closes its shard
    writer.fill(model, processor, images, batch_size=2)
    for name in writer.fingerprints:
        shards = sorted(writer.folder(name).glob("*.json"))
        assert len(shards) == 5 and len(list(writer.folder(name).glob("*.bin"))) == 5
        index = json.loads(shards[0].read_text())
        assert index["dtype"] == "float16" and index["source_dtype"] == "float32" and len(index["keys"]) == 1
        assert shards[0].with_suffix(".bin").stat().st_size == 2 * int(torch.tensor(index["shape"]).prod())
    with pytest.raises(KeyError, match="fill the cache first"):
        reader.load(keys)
    reader.refresh()
    for name, feature in reader.load(keys).items():
        torch.testing.assert_close(feature, writer.load(keys)[name], atol=0, rtol=0)
    big = FeatureCache.for_model(root.with_name("one-shard"), model, processor)
    big.fill(model, processor, images, batch_size=2)
    assert all(len(list(big.folder(name).glob("*.bin"))) == 1 for name in big.fingerprints)
    assert big.disk_bytes() == writer.disk_bytes()


def test_cache_keys_depend_on_the_expert_config_and_weights(cache_setup):
    cache, model, processor = cache_setup
    before = expert_fingerprint(model, processor, "caption")
    with torch.no_grad():
        next(model.model.experts["caption"].parameters()).add_(1.0)
    assert expert_fingerprint(model, processor, "caption") != before
    assert expert_fingerprint(model, processor, "segmentation") == cache.fingerprints["segmentation"]


def test_a_damaged_shard_is_dropped_and_its_entries_recomputed(cache_setup):
    cache, model, processor = cache_setup
    image = Image.new("RGB", (20, 20), "purple")
    key = image_key(image)
    cache.fill(model, processor, [image])
    (shard,) = cache.folder("caption").glob("*.bin")
    assert not list(cache.root.rglob("*.partial")) and not list(cache.root.rglob("*.tmp"))  # nothing left behind
    shard.write_bytes(shard.read_bytes()[:20])  # a damaged shard (as from a failing disk)
    reopened = FeatureCache(cache.root, cache.fingerprints)
    assert reopened.get("caption", key) is None and not shard.exists()
    assert reopened.get("detection", key) is not None  # other experts' shards are untouched
    misses = reopened.misses
    assert reopened.fill(model, processor, [image])["misses"] == misses + 1  # only the caption entry is computed
    assert reopened.get("caption", key) is not None


def test_dataloader_workers_read_the_cache_and_their_reads_count_here(cache_setup):
    """`dataloader_num_workers` > 0: the collator's cache is copied into worker processes; they read the same
    features, and their hits add to this process's. A pickled copy opens the shards again and counts on its own."""
    cache, model, processor = cache_setup
    images = [Image.new("RGB", (24, 24), c) for c in ("navy", "gold", "teal", "plum")]
    cache.fill(model, processor, images)
    keys = [image_key(image) for image in images]
    hits = cache.hits
    batches = list(torch.utils.data.DataLoader(keys, batch_size=2, collate_fn=cache.load, num_workers=1))
    assert cache.hits == hits + len(keys) * 4  # every expert's entry of every image, read in the worker
    expected = cache.load(keys)
    for name, feature in expected.items():
        torch.testing.assert_close(torch.cat([batch[name] for batch in batches]), feature, atol=0, rtol=0)
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.hits == cache.hits
    for name, feature in copy.load(keys[:1]).items():
        torch.testing.assert_close(feature, expected[name][:1], atol=0, rtol=0)
    assert copy.hits == cache.hits + 4 and cache.hits == hits + len(keys) * 8


def test_a_killed_fill_leaves_no_entry_and_its_leftovers_go(cache_setup, monkeypatch):
    """A fill killed before its shards are renamed and indexed leaves no entry that could be read half-written; the
    next fill by the same rank removes the leftover and computes the entries."""
    cache, model, processor = cache_setup
    import astrea.training.feature_cache as module

    image = Image.new("RGB", (20, 20), "olive")
    real_replace = module.os.replace

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        cache.fill(model, processor, [image])
    monkeypatch.setattr(module.os, "replace", real_replace)
    assert list(cache.root.rglob("*.bin.partial")) and not list(cache.root.rglob("*.json"))
    fresh = FeatureCache(cache.root, cache.fingerprints)
    assert not any((name, image_key(image)) in fresh for name in fresh.fingerprints)
    assert fresh.fill(model, processor, [image])["misses"] == 4
    assert not list(cache.root.rglob("*.bin.partial")) and fresh.get("caption", image_key(image)) is not None


def test_features_beyond_float16_are_refused_by_name(cache_setup):
    cache, *_ = cache_setup
    with pytest.raises(ValueError, match="segmentation expert's features reach 1e\\+05.*bfloat16"):
        cache.put("segmentation", "ab" * 16, torch.tensor([[1.0e5, 0.0]]))
    bf16 = FeatureCache(cache.root.with_name("bf16"), cache.fingerprints, dtype="bfloat16")
    bf16.put("segmentation", "ab" * 16, torch.tensor([[1.0e5, 0.0]]))
    bf16.flush()
    assert bf16.get("segmentation", "ab" * 16).tolist() == [[torch.tensor(1.0e5).bfloat16().item(), 0.0]]
    with pytest.raises(ValueError, match="floating-point dtype"):
        FeatureCache(cache.root, cache.fingerprints, dtype="int8")


def test_cache_directory_under_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        FeatureCache(blocker / "cache", {"caption": "x"})


def test_processes_split_the_fill_and_then_read_everything(tmp_path):
    """Under torch.distributed each process runs the experts on its own share of the images, not all of them, and
    after the fill every process reads every entry."""
    import json
    from pathlib import Path

    from astrea_testing import torchrun_two

    result = torchrun_two(Path(__file__).with_name("cache_ranks.py"), tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert sum(r["encoded"] for r in ranks) == 8 and all(0 < r["encoded"] < 8 for r in ranks)  # each image once
    assert sum(r["stats"]["misses"] for r in ranks) == 8 * 4
    every_entry = dict.fromkeys(("caption", "classification", "detection", "segmentation"), 8)
    assert all(r["rows"] == every_entry for r in ranks)


def test_the_fill_streams_its_images(cache_setup):
    """At most a batch of decoded images waits for the experts: the images are consumed as they are encoded."""
    cache, model, processor = cache_setup
    drawn, encoded_when_drawn = [], []
    model.model.experts["caption"].register_forward_hook(lambda module, args, output: drawn.append("batch"))

    def images():
        for index in range(7):
            encoded_when_drawn.append(drawn.count("batch"))
            yield Image.new("RGB", (24, 24), (30 * index, 20, 200 - 20 * index))

    cache.fill(model, processor, images(), batch_size=3)
    assert encoded_when_drawn == [0, 0, 0, 1, 1, 1, 2]  # a batch of 3 runs before the 4th image is drawn
    assert drawn.count("batch") == 3
