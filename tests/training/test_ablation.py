"""astrea-train ablate: the variants, the tables, a micro run end to end (with resume), and the cached-feature
evaluation path that the ablation runs use."""

import csv
import json

import pytest
import torch

from astrea.evaluation.benchmark import PixelInputs, evaluate, load_benchmark
from astrea.evaluation.synthetic import synthetic_rows, write_synthetic_benchmark
from astrea.training import ablation, pipeline
from astrea.training.cli import main as astrea_train
from astrea.training.recipe import Recipe


def micro(tmp_path, **ablation_args) -> Recipe:
    return Recipe.from_dict(
        {
            "output_dir": str(tmp_path / "ablations"),
            "cache_dir": str(tmp_path / "cache"),
            "data": {"num_train": 12, "num_test": 3},
            "prealign": {"stage_steps": [2, 1, 1, 1], "batch_size": 4, "save_steps": 1000, "learning_rate": 1e-2},
            "instruct": {"steps": 2, "batch_size": 4, "save_steps": 1000, "tasks": ["questions", "caption"]},
            "eval": {"batch_size": 8, "max_new_tokens": 2},
            "ablation": ablation_args,
        }
    )


def test_variants_follow_the_papers_tables_and_equal_settings_share_a_run(tmp_path):
    recipe = micro(tmp_path)
    found = {v.name: v for v in ablation.variants(recipe)}
    assert [n for n, v in found.items() if v.table == "Table 3"] == ["top_k=1", "top_k=2", "top_k=3", "top_k=4"]
    assert {n for n, v in found.items() if v.table == "Table 6"} == {"order=forward", "order=reverse", "order=joint"}
    base = recipe.to_dict()
    settings = {name: ablation.run_settings(base, v) for name, v in found.items()}
    assert settings["full"] == settings["top_k=3"] == settings["order=forward"]  # the micro recipe's top-k is 3
    assert len(set(settings.values())) == 9
    reverse = json.loads(settings["order=reverse"])["prealign"]
    assert reverse["order"] == ["segmentation", "detection", "classification", "caption"]
    assert reverse["stage_steps"] == [1, 1, 1, 2]  # each expert keeps its own steps


def test_tables_report_mean_and_std_over_seeds_and_paired_differences(tmp_path):
    values = {column: [] for column, _, _ in ablation.COLUMNS}
    rows = [
        {"table": "Table 4", "variant": "full", "values": {**values, "vqa_acc": [0.4, 0.8]}, "runs": "full"},
        {"table": "Table 4", "variant": "no_moco", "values": {**values, "vqa_acc": [0.5, 0.7]}, "runs": "no_moco"},
    ]
    ablation.write_tables(tmp_path, rows, [0, 1], "note")
    table = (tmp_path / "table.md").read_text()
    # mean 0.6, sample std 0.141; seed by seed against the full model: +0.1 and -0.1
    dashes = " - |" * (len(ablation.COLUMNS) - 1)  # the other metrics have no values here
    assert f"| no_moco | 0.600 ± 0.141 |{dashes} 0.000 ± 0.141 |" in table
    assert "| full | 0.600 ± 0.283 |" in table and table.rstrip().endswith("|") and "**Table 4**" in table
    with open(tmp_path / "table.csv") as handle:
        line = list(csv.DictReader(handle))[1]
    assert line["variant"] == "no_moco" and line["seeds"] == "2"
    assert float(line["vqa_acc_delta_mean"]) == pytest.approx(0.0, abs=1e-9)
    assert float(line["vqa_acc_mean"]) == pytest.approx(0.6) and float(line["vqa_acc_std"]) == pytest.approx(
        0.1414, 1e-3
    )


def test_a_micro_ablation_trains_each_distinct_run_once_per_seed_and_resumes(tmp_path, monkeypatch):
    real_prealign = pipeline.prealign
    recipe = micro(tmp_path, seeds=[0, 1], variants=["full", "top_k=3", "no_moco"])
    prealigned = []
    monkeypatch.setattr(pipeline, "prealign", lambda ws: prealigned.append(ws.recipe.seed) or real_prealign(ws))
    record = ablation.ablate(recipe, "micro")
    assert sorted(prealigned) == [0, 1]  # full and no_moco differ after pre-alignment: one per seed
    out = tmp_path / "ablations"
    assert record["runs"] == 4  # full (= top_k=3) and no_moco, two seeds each
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["full", "no_moco"]
    for variant, moco in (("full", True), ("no_moco", False)):
        for seed in (0, 1):
            used = json.loads((out / "runs" / variant / f"seed-{seed}" / "recipe.json").read_text())
            assert used["instruct"]["use_moco"] is moco and used["seed"] == seed
            result = json.loads((out / "runs" / variant / f"seed-{seed}.json").read_text())
            assert set(result["summary"]["tasks"]) == {"vqa", "caption", "grounding", "retrieval"}
    with open(out / "table.csv") as handle:
        lines = {line["variant"]: line for line in csv.DictReader(handle)}
    assert set(lines) == {"full", "top_k=3", "no_moco"} and lines["full"]["seeds"] == "2"
    assert {k: v for k, v in lines["full"].items() if k != "table"} == {
        k: (v if k != "variant" else "full") for k, v in lines["top_k=3"].items() if k != "table"
    }
    assert "full = top_k=3" not in (out / "table.md").read_text()  # the shared run is stored as "full"

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation, "train_and_evaluate", no_training)
    assert ablation.ablate(recipe, "micro")["runs"] == 4


def test_other_stage_orders_pre_align_with_their_own_residual_attention(tmp_path):
    record = ablation.ablate(micro(tmp_path, seeds=[0], variants=["order=reverse", "order=joint"]), "micro")
    assert record["runs"] == 2
    used = json.loads((tmp_path / "ablations" / "runs" / "order=reverse" / "seed-0" / "recipe.json").read_text())
    assert used["prealign"]["order"][-1] == "caption" and not used["prealign"]["joint"]


def test_a_stored_run_from_other_settings_is_refused_not_mixed_in(tmp_path):
    recipe = micro(tmp_path, seeds=[0], variants=["no_moco"])
    ablation.ablate(recipe, "micro")
    changed = Recipe.from_dict({**recipe.to_dict(), "instruct": {**recipe.to_dict()["instruct"], "steps": 3}})
    with pytest.raises(ValueError, match="made with other settings"):
        ablation.ablate(changed, "micro")


def test_an_unknown_variant_or_bad_seeds_stop_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'out'}\nablation: {{variants: [top_k=9]}}\n")
    assert astrea_train(["ablate", "--recipe", str(recipe)]) == 2
    assert "unknown variant 'top_k=9'" in capsys.readouterr().err
    assert astrea_train(["ablate", "--recipe", str(recipe), "--seeds", "1", "1"]) == 2
    assert "ablation.seeds must be distinct" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cached_features_give_the_inputs_the_experts_give(tmp_path):
    """The ablation evaluates through the feature cache; astrea-eval runs the experts. Same images, same inputs."""
    ws = pipeline.prepare(micro(tmp_path))
    write_synthetic_benchmark(tmp_path / "bench", num_images=3, seed=0)  # the micro recipe's held-out images
    from_files = load_benchmark(tmp_path / "bench" / "caption.jsonl")
    from_cache = synthetic_rows(ws.data["test"], ws.keys["test"])["caption"]
    prompts = [r["question"] for r in from_files]
    with torch.no_grad():
        cached = pipeline.CachedInputs(ws).generation(from_cache, prompts)
        pixels = PixelInputs(ws.processor).generation(from_files, prompts)
        live = ws.model.get_image_features(**{k: v for k, v in pixels.items() if "pixel" in k})
    assert torch.equal(cached["input_ids"], pixels["input_ids"])
    assert torch.equal(cached["attention_mask"], pixels["attention_mask"])
    torch.testing.assert_close(cached["mm_encoder_outputs"]["image"].pooler_output, live.pooler_output)
    _, summary = pipeline.evaluate_benchmark(ws, from_cache)
    _, direct = evaluate(ws.model, ws.processor, from_files, batch_size=8, progress=False)
    assert summary["tasks"]["caption"] == direct["tasks"]["caption"]
