"""The recipe on files in public formats: the synthetic set written out as COCO captions and instances and LLaVA
conversations (training/export.py), read back through training/sources.py, trained and evaluated."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from astrea_testing import REPO, TINY

from astrea.training import pipeline
from astrea.training.collator import annotation_target, stage_target
from astrea.training.data import CAPTION_PROMPT, QUESTION_TYPES, build_dataset, question_type
from astrea.training.export import export_synthetic
from astrea.training.recipe import Recipe
from astrea.training.sources import BadRows, SourceArgs, read_source

STAGES = ["caption", "classification", "detection", "segmentation"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    dataset = build_dataset(12, 4, 64, seed=3)
    return root, dataset, export_synthetic(dataset, root / "files")


def test_the_files_give_back_the_synthetic_targets(exported):
    """COCO boxes in pixels and RLE masks, read back, make the same pre-alignment targets, word for word, as the
    synthetic rows they came from (boxes normalised by the real image size, masks decoded at it)."""
    _, dataset, sources = exported
    captions, instances = (SourceArgs(**spec) for spec in sources[:2])
    bad = BadRows()
    by_image = {r["image"]: r for r in read_source(instances, bad)}
    for record in read_source(captions, bad):
        by_image[record["image"]]["caption"] = record["caption"]
    assert not bad.problems and len(by_image) == 12
    for index, row in enumerate(dataset["train"]):
        record = next(r for path, r in by_image.items() if path.endswith(f"train-{index:05d}.png"))
        for stages in (STAGES[:1], STAGES[:2], STAGES[:3], STAGES):
            assert annotation_target(record, stages) == stage_target(row, stages, 64), (index, stages)


def test_conversations_hold_multi_turn_and_text_only_rows(exported):
    _, dataset, sources = exported
    bad = BadRows()
    train = read_source(SourceArgs(**sources[2]), bad)
    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in train]
    assert max(turns) > 1 and min(turns) == 1
    questions = sum(len(row["questions"]) for row in dataset["train"])
    captions = [r for r in train if CAPTION_PROMPT in str(r["messages"][0]["content"])]
    assert [r["messages"][-1]["content"] for r in captions] == [row["caption"] for row in dataset["train"]][::4]
    asked = sum(turns[i] for i, r in enumerate(train) if r["images"] and r not in captions)
    assert asked == questions  # every question, once
    test = read_source(SourceArgs(**sources[5]), bad)
    assert {r["type"] for r in test} <= set(QUESTION_TYPES)
    # each held-out question's subgroup is the number of objects in its image
    objects = [len(row["labels"]) for row in dataset["test"] for _ in row["questions"]]
    assert [r["subgroup"] for r in test] == [f"{n} object" + "s" * (n > 1) for n in objects]


def test_turns_per_row_asks_each_question_once_in_conversations_of_that_many_turns(tmp_path):
    """data.turns_per_row: every training question is asked exactly once, at most that many to a conversation about
    one image, the image's questions not all in their drawn order, and no earlier turn of a conversation gives a
    later answer away: a colour or shape question follows no turn that names its object's colour and shape, a
    presence question no turn that names its colour or its shape, a count question no turn at all, and a pair's
    places are compared once (the other way round is the opposite answer)."""
    dataset = build_dataset(40, 2, 64, seed=3)
    sources = export_synthetic(dataset, tmp_path, turns_per_row=4)
    rows = read_source(SourceArgs(**sources[2]), BadRows())
    asked: dict[str, list] = {}
    checked = {"colour": 0, "shape": 0, "presence": 0, "count": 0}
    for row in rows:
        if not row["images"] or CAPTION_PROMPT in str(row["messages"][0]["content"]):
            continue
        pairs = [
            (str(user["content"]).replace("<image>", "").strip(), reply["content"])
            for user, reply in zip(row["messages"][::2], row["messages"][1::2], strict=True)
        ]
        assert 1 <= len(pairs) <= 4 and row["messages"][0]["role"] == "user"
        for turn, (question, answer) in enumerate(pairs):
            earlier = [set(f"{q} {a}".replace("?", "").split()) for q, a in pairs[:turn]]
            words = question.rstrip("?").split()
            if question.startswith("What colour is the "):  # its shape and its answer, named together before
                kind, given_away = "colour", any({words[-1], answer} <= said for said in earlier)
            elif question.startswith("What shape is the "):
                kind, given_away = "shape", any({words[-2], answer} <= said for said in earlier)
            elif question.startswith("Is there a "):
                kind, given_away = "presence", any({words[-2], words[-1]} & said for said in earlier)
            elif question.startswith("How many"):
                kind, given_away = "count", turn > 0
            else:
                continue
            assert not given_away, pairs
            checked[kind] += turn > 0 or kind == "count"
        assert sum(" left or right of " in q for q, _ in pairs) <= 1, pairs
        asked.setdefault(Path(row["images"][0]).name, []).extend(pairs)
    assert max(len(r["messages"]) for r in rows) == 8
    assert all(checked.values()), checked  # each kind was asked after another turn (count: first) somewhere
    reordered = 0
    for index, example in enumerate(dataset["train"]):
        drawn = [(q["question"], q["answer"]) for q in example["questions"]]
        got = asked[f"train-{index:05d}.png"]
        assert sorted(got) == sorted(drawn)
        reordered += got != drawn
    assert reordered > 0
    with pytest.raises(ValueError, match="data.turns_per_row"):
        Recipe.from_dict({"data": {"files": "data", "turns_per_row": 0}})
    with pytest.raises(ValueError, match="set data.files"):
        Recipe.from_dict({"data": {"turns_per_row": 3}})
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="instruct.image_branches"):
            Recipe.from_dict({"instruct": {"image_branches": bad}})


def test_the_unseen_renderer_split_is_evaluated_under_its_own_names(tmp_path):
    """With data.num_unseen, the unseen-renderer split's questions feed evaluation as "<type> (unseen renderer)",
    whose chance level is its type's."""
    dataset = build_dataset(2, 2, 64, seed=3, num_unseen=3)
    sources = export_synthetic(dataset, tmp_path)
    assert [Path(s["path"]).name for s in sources if s["phases"] == ["eval"]][-1] == "llava_unseen.json"
    rows = read_source(SourceArgs(**sources[-1]), BadRows())
    assert len(rows) == sum(len(row["questions"]) for row in dataset["unseen"])
    assert {r["type"] for r in rows} <= {f"{kind} (unseen renderer)" for kind in QUESTION_TYPES}
    assert all(Path(r["images"][0]).name.startswith("unseen-") for r in rows)
    assert question_type("count (unseen renderer)") == "count" == question_type("count")
    assert len(export_synthetic(build_dataset(2, 2, 64, seed=3), tmp_path / "plain")) == len(sources) - 1


def source_recipe(root, sources, **data) -> Recipe:
    return Recipe.from_dict(
        {
            "output_dir": str(root / "run"),
            "cache_dir": str(root / "cache"),
            "model": {"config": str(TINY)},
            "data": {"sources": sources, **data},
            "prealign": {"stage_steps": [2, 2, 2, 2], "batch_size": 4, "save_steps": 1000, "logging_steps": 1},
            "instruct": {"steps": 3, "batch_size": 4, "save_steps": 1000, "logging_steps": 1},
            "eval": {"batch_size": 8, "max_new_tokens": 2},
        }
    )


def test_the_whole_recipe_trains_and_evaluates_from_the_files(exported, tmp_path):
    _, dataset, sources = exported
    metrics = pipeline.run(source_recipe(tmp_path, sources))
    assert [s["stage"] for s in metrics["stages"]] == [
        "1-caption", "2-classification", "3-detection", "4-segmentation", "instruct",
    ]  # fmt: skip
    kinds = {qa["type"] for row in dataset["test"] for qa in row["questions"]}
    assert set(metrics["accuracy"]) == kinds  # grouped by the rows' categories
    assert all(0.0 <= value <= 1.0 for value in metrics["accuracy"].values())
    # by subgroup (objects in the image): the groups' counts add up to the type's, and their hits to its accuracy
    assert set(metrics["subgroups"]) == kinds
    for kind, groups in metrics["subgroups"].items():
        assert sum(g["n"] for g in groups.values()) == metrics["count"][kind]
        hits = sum(g["accuracy"] * g["n"] for g in groups.values())
        assert hits == pytest.approx(metrics["accuracy"][kind] * metrics["count"][kind], abs=1e-3)
    assert all(stage["heldout"] for stage in metrics["stages"])  # held out: the eval phase's files
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_evaluation_takes_text_only_and_multi_image_rows_and_routes_each_row_on_its_own_images(exported, tmp_path):
    """An eval source of text-only rows (a whole batch of them first) and two-image rows: evaluation answers every
    row, and each type's router shares come from its own rows' images (none for the text-only type)."""
    root, _, sources = exported
    turns = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red"}]
    rows = [{"id": f"t{i}", "conversations": turns} for i in range(9)] + [
        {
            "id": f"m{i}",
            "image": [f"test-0000{i}.png", f"test-0000{i + 1}.png"],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nWhich image has more objects?"},
                {"from": "gpt", "value": "the first"},
            ],
        }
        for i in range(2)
    ]
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(rows))
    images = str(root / "files" / "images")
    text_only = {"format": "llava", "path": str(extra), "image_root": images, "phases": ["eval"], "name": "mixed"}
    recipe = source_recipe(tmp_path, [text_only, *sources])
    ws = pipeline.prepare(recipe)
    examples = pipeline.conversation_examples([r for r in ws.records["eval"] if "messages" in r])
    assert [e["type"] for e in examples[:11]] == ["mixed"] * 11
    texts, routers = pipeline.answers(ws, examples[:20], batch_size=8)
    assert len(texts) == len(routers) == 20
    assert routers[:9] == [None] * 9 and all(r is not None for r in routers[9:])
    # a two-image row's shares: the mean over both its images' tokens, as the model routes them alone
    batch = ws.collator.generation_inputs(examples[9:10])
    with torch.no_grad():
        alone = ws.model.get_image_features(
            expert_features=batch["expert_features"], prompt_input_ids=batch["input_ids"], return_dict=True
        )
    torch.testing.assert_close(routers[9]["all"], alone.router_probs.float().mean(dim=(0, 1)))
    metrics = pipeline.evaluate(ws)
    assert metrics["count"]["mixed"] == 11
    kinds = {e["type"] for e in examples}
    assert set(metrics["router"]) == kinds  # every type has shares: the mixed one from its two image rows
    assert all(sum(shares.values()) == pytest.approx(1.0) for shares in metrics["router"].values())


def test_router_shares_are_also_reported_under_the_objects_and_elsewhere(exported, tmp_path):
    """With the eval images' COCO instances among the sources, evaluation also gives each type's router shares over
    the visual tokens under an object's box and over the others, and router.png shows both beside the whole."""
    _, dataset, sources = exported
    grid = 4
    boxes = [[0.0, 0.0, 0.25, 0.25], [0.5, 0.6, 1.0, 0.8], [0.0, 0.5, 0.1, 1.0]]
    masks = pipeline.object_token_masks([{"keys": ["k"], "boxes": boxes}], grid)
    expected = torch.zeros(grid, grid, dtype=torch.bool)  # [row, column]
    expected[0, 0] = True  # the first box is exactly the top-left cell
    expected[2:4, 2:4] = True  # y 0.6-0.8 is rows 2 and 3 (0.5-0.75, 0.75-1.0); x 0.5-1.0 columns 2 and 3
    expected[2:4, 0] = True  # x 0-0.1 is column 0 only, y 0.5-1.0 rows 2 and 3
    assert torch.equal(masks["k"], expected.flatten())
    edge = pipeline.object_token_masks([{"keys": ["k"], "boxes": [[0.0, 0.0, 1.0, 0.35]]}], 20)["k"].view(20, 20)
    assert edge[:7].all() and not edge[7:].any()  # 0.35 * 20 is 7.000000000000001: row 7 is not under it

    recipe = source_recipe(tmp_path, sources)
    recipe.model.overrides = {"image_grid_size": grid}
    ws = pipeline.prepare(recipe)
    metrics = pipeline.evaluate(ws)
    kinds = {qa["type"] for row in dataset["test"] for qa in row["questions"]}
    assert set(metrics["router_objects"]) == set(metrics["router_background"]) == set(metrics["router"]) == kinds
    for part in ("router", "router_objects", "router_background"):
        assert all(sum(shares.values()) == pytest.approx(1.0) for shares in metrics[part].values())
    # one example by hand: its tokens' probabilities, and the cells its image's boxes overlap, counted here
    example = pipeline.conversation_examples([r for r in ws.records["eval"] if "messages" in r])[0]
    batch = ws.collator.generation_inputs([example])
    with torch.no_grad():
        probs = ws.model.get_image_features(
            expert_features=batch["expert_features"], prompt_input_ids=batch["input_ids"], return_dict=True
        ).router_probs[0]
    instances = next(r for r in ws.records["eval"] if r.get("boxes") and r["keys"] == example["keys"])
    under = [
        row * grid + column
        for row in range(grid)
        for column in range(grid)
        if any(x0 < (column + 1) / grid and x1 > column / grid and y0 < (row + 1) / grid and y1 > row / grid
               for x0, y0, x1, y1 in instances["boxes"])
    ]  # fmt: skip
    assert 0 < len(under) < grid * grid
    _, routers = pipeline.answers(ws, [example], token_masks=pipeline.object_token_masks(ws.records["eval"], grid))
    torch.testing.assert_close(routers[0]["objects"], probs[under].mean(dim=0))
    torch.testing.assert_close(routers[0]["all"], probs.mean(dim=0))
    pipeline.plot_router(metrics, tmp_path / "router.png")
    pipeline.plot_router({"router": {}}, tmp_path / "empty.png")  # an evaluation that routed nothing: an empty chart
    assert (tmp_path / "router.png").stat().st_size > (tmp_path / "empty.png").stat().st_size > 0


def test_an_image_that_does_not_decode_stops_before_training_or_is_skipped(exported, tmp_path):
    root, _, sources = exported
    rows = json.loads(open(sources[2]["path"]).read())
    (root / "files" / "images" / "broken.png").write_bytes(b"not a png")
    rows.append({"id": "broken", "image": "broken.png", "conversations": rows[0]["conversations"][:2]})
    bad_file = tmp_path / "llava_bad.json"
    bad_file.write_text(json.dumps(rows))
    mixed = [sources[0], {**sources[2], "path": str(bad_file), "name": "mine"}]
    with pytest.raises(ValueError, match="mine, row broken, image: does not decode"):
        pipeline.prepare(source_recipe(tmp_path, mixed))
    assert not (tmp_path / "run" / "stages").exists()
    ws = pipeline.prepare(source_recipe(tmp_path, mixed, on_bad_row="skip"))
    assert [r["id"] for r in ws.records["instruct"]] == [r["id"] for r in rows[:-1]]
    assert all(len(r["keys"]) == len(r["images"]) for r in ws.records["instruct"])


def test_an_over_long_conversation_is_a_bad_row(exported, tmp_path):
    """Conversations longer than data.max_length (image tokens included) are reported before training, or left
    out whole: never cut inside an image's placeholders."""
    _, _, sources = exported
    ws = pipeline.prepare(source_recipe(tmp_path, sources[2:3]))
    lengths = {
        r["id"]: ws.collator.length({"keys": r["keys"], "messages": r["messages"]}) for r in ws.records["instruct"]
    }
    limit = sorted(lengths.values())[len(lengths) // 2]
    with pytest.raises(ValueError, match=f"tokens, over data.max_length {limit}"):
        pipeline.prepare(source_recipe(tmp_path, sources[2:3], max_length=limit))
    ws = pipeline.prepare(source_recipe(tmp_path, sources[2:3], max_length=limit, on_bad_row="skip"))
    kept = [r["id"] for r in ws.records["instruct"]]
    assert kept == [key for key, length in lengths.items() if length <= limit] and 0 < len(kept) < len(lengths)


def test_the_13b_recipe_reads_its_data_sets_in_their_formats(tmp_path, monkeypatch):
    """Every source astrea-13b.yaml lists, as a one-row file of its format at the listed path (the downloads are the
    user's): all of them read, feed their phases, and a video row gets its frames."""
    from PIL import Image

    from astrea.training.pipeline import read_sources

    recipe = Recipe.from_yaml(str(REPO / "training" / "recipes" / "astrea-13b.yaml"))
    monkeypatch.chdir(tmp_path)
    for spec in recipe.data.source_args():
        path, root = tmp_path / spec.path, tmp_path / (spec.image_root or Path(spec.path).parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), "red").save(root / "x.png")
        (root / "clip").mkdir(exist_ok=True)
        Image.new("RGB", (32, 24), "blue").save(root / "clip" / "0.png")
        coco = {
            "images": [{"id": 1, "file_name": "x.png", "width": 32, "height": 24}],
            "categories": [{"id": 1, "name": "dot"}],
        }
        if spec.format == "coco_captions":
            data = {**coco, "annotations": [{"id": 1, "image_id": 1, "caption": "A red picture."}]}
        elif spec.format == "coco_instances":
            data = {**coco, "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4],
                                             "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}]}  # fmt: skip
        elif spec.format == "llava_pretrain" or spec.image_root is None:
            image = {"image": "x.png"} if spec.format == "llava_pretrain" else {}
            marker = "<image>\n" if image else ""
            data = [
                {
                    "id": "1",
                    **image,
                    "conversations": [{"from": "human", "value": marker + "Q"}, {"from": "gpt", "value": "A"}],
                }
            ]
        elif "video" in spec.path:
            data = [
                {
                    "id": "1",
                    "video": "clip",
                    "conversations": [{"from": "human", "value": "<video>\nQ"}, {"from": "gpt", "value": "A"}],
                }
            ]
        else:
            data = [
                {
                    "id": "1",
                    "image": "x.png",
                    "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
                }
            ]
        path.write_text(json.dumps(data))
    records = read_sources(recipe, recipe.data.source_args())
    instruct_sources = [s for s in recipe.data.source_args() if "instruct" in s.phases]
    assert len(records["instruct"]) == len(instruct_sources) and len(records["eval"]) >= 2
    # pre-alignment: one record per image, captions and instances of the same image merged
    assert len(records["prealign"]) == 2
    assert all(r["caption"] and r["boxes"] for r in records["prealign"])
    assert any(r.get("frames") == [1] for r in records["instruct"])


def test_focus_finetune_reads_a_finished_run_back(exported, tmp_path):
    """examples/focus_finetune.py on a finished run: the chosen questions alone, then the mix; accuracy as it goes,
    and the run's folder left as it was."""
    _, _, sources = exported
    pipeline.run(source_recipe(tmp_path, sources))
    run = tmp_path / "run"
    before = {path: path.stat().st_mtime_ns for path in run.rglob("*") if path.is_file()}
    command = [sys.executable, "examples/focus_finetune.py", "--run", str(run), "--question", "How many objects"]
    result = subprocess.run(
        [*command, "--steps", "2", "--mix-from", "1", "--focus-share", "0.5", "--every", "1", "--batch-size", "2"]
        + ["--eval-size", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("12 training questions contain 'How many objects'")  # one per training image
    assert lines[0].endswith("; 3 held out")
    assert lines[1].startswith("step 0: held-out accuracy")
    assert lines[2].startswith("step 1 (focus): loss") and lines[3].startswith("step 2 (mix, 50% chosen): loss")
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*") if path.is_file()} == before
    missing = subprocess.run(
        [*command[:3], str(tmp_path / "nothing"), *command[4:]], cwd=REPO, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "recipe.json does not exist" in missing.stderr
    share = subprocess.run([*command, "--focus-share", "2"], cwd=REPO, capture_output=True, text=True)
    assert share.returncode == 2 and "--focus-share is a share of each batch, from 0 to 1, not 2.0" in share.stderr
    big = subprocess.run([*command, "--batch-size", "13"], cwd=REPO, capture_output=True, text=True)
    assert big.returncode == 2 and "--batch-size 13 is more than the 12 questions to draw" in big.stderr


def test_the_accuracy_table_reports_types_by_subgroup():
    """A type answered over several subgroups gets a line of them; one subgroup alone, or the unseen renderer's
    names (in metrics.json only), do not."""
    group = {"accuracy": 0.5, "n": 2}
    metrics = {
        "accuracy": {"colour": 0.75, "count": 1.0, "colour (unseen renderer)": 0.5},
        "chance": {"colour": 1 / 6, "count": 1 / 3, "colour (unseen renderer)": 1 / 6},
        "count": {"colour": 4, "count": 2, "colour (unseen renderer)": 4},
        "subgroups": {
            "colour": {"1 object": {"accuracy": 1.0, "n": 2}, "2 objects": group},
            "count": {"1 object": {"accuracy": 1.0, "n": 2}},
            "colour (unseen renderer)": {"1 object": group, "2 objects": group},
        },
    }
    table = pipeline.accuracy_table(metrics)
    assert "| colour | 75.0% | 16.7% | 4 |" in table
    assert "colour by subgroup: 1 object 100.0% (2), 2 objects 50.0% (2)" in table
    assert table.count("by subgroup") == 1


def test_moco_reads_the_coco_caption_of_each_conversations_image(exported, tmp_path):
    """Instruction tuning's examples about one image carry that image's caption from the COCO captions file (matched
    by the image, not the row) as MoCo's text; text-only rows carry none. The instruct stage gives them to the
    collator, whose batches then hold MoCo's caption texts."""
    _, dataset, sources = exported
    ws = pipeline.prepare(source_recipe(tmp_path, sources))
    captions = {r["keys"][0]: r["caption"] for r in ws.records["prealign"] if r.get("caption")}
    records = ws.records["instruct"]
    examples = pipeline.with_moco_captions(pipeline.conversation_examples(records), captions)
    with_image = 0
    for record, example in zip(records, examples, strict=True):
        if not record["keys"]:
            assert example["moco_text"] is None  # the key is there (Dataset.from_list reads the first row's keys)
            continue
        with_image += 1
        index = int(record["id"].split("-")[1])  # export.py's row ids: train-<image index>-<row>
        assert example["moco_text"] == dataset["train"][index]["caption"]
    assert with_image > len(dataset["train"])  # several conversations per image, each with its image's caption
    from datasets import Dataset

    text_only = {"keys": [], "messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "hi"}]}
    text_only = pipeline.with_moco_captions([{**text_only, "frames": [], "type": "text"}], captions)[0]
    assert text_only["moco_text"] is None
    first_without = Dataset.from_list([text_only, *examples[:3]])  # as the stage builds its data set
    batch = ws.collator(list(first_without))
    assert batch["moco_attention_mask"].shape[0] == 4
    assert not batch["moco_attention_mask"][0].any() and batch["moco_attention_mask"][1:].any(dim=1).all()
