"""The paper's ablations (Tables 3, 4 and 6) on the synthetic set: every variant trained and evaluated over
several seeds, reported as mean ± std.

    astrea-train ablate --recipe training/recipes/ablation.yaml             # make ablations
    astrea-train ablate --recipe training/recipes/ablation-quick.yaml       # make ablations-quick

What all runs share is built once: the data set, the experts (pre-trained once, as released checkpoints would
be) and their feature cache. Each run then starts from its own seed (projectors, router, adapters, LLM, data
order), runs pre-alignment and instruction tuning with its variant's settings, and is evaluated on the held-out
images' benchmark splits (astrea.evaluation.synthetic: VQA, captioning, grounding, retrieval). Runs write
`runs/<variant>/seed-<n>.json` under the output folder and are skipped when that file exists, so an
interrupted ablation continues where it stopped. Variants that are the same run (top_k=3, the full model and
the forward order, with the default recipe) are trained once and reported in each table, and variants that differ
only in instruction tuning (top-k, MoCo) share each seed's pre-alignment instead of repeating it.
"""

import csv
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from modeling_astrea import EXPERT_NAMES

from .recipe import Recipe, deep_merge

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Variant:
    table: str  # the paper's table it belongs to
    name: str  # the `variant` column
    overrides: dict  # recipe changes from the ablation recipe


def variants(recipe: Recipe) -> list[Variant]:
    """Tables 3 (top-k), 4 (random residual, MoCo) and 6 (stage order), in the paper's layout."""
    order = list(recipe.prealign.order)
    steps = dict(zip(order, recipe.prealign.stage_steps, strict=True))  # each expert keeps its step budget
    reverse = order[::-1]
    out = [
        Variant("Table 3", f"top_k={k}", {"instruct": {"router_top_k": k}}) for k in range(1, len(EXPERT_NAMES) + 1)
    ]
    out += [
        Variant("Table 4", "full", {}),
        Variant("Table 4", "no_residual", {"prealign": {"residual": False}}),
        Variant("Table 4", "no_moco", {"instruct": {"use_moco": False}}),
        Variant("Table 4", "no_residual_no_moco", {"prealign": {"residual": False}, "instruct": {"use_moco": False}}),
        Variant("Table 6", "order=forward", {}),
        Variant(
            "Table 6", "order=reverse", {"prealign": {"order": reverse, "stage_steps": [steps[e] for e in reverse]}}
        ),
        Variant("Table 6", "order=joint", {"prealign": {"joint": True}}),
    ]
    return out


def run_settings(base: dict, variant: Variant) -> str:
    """What makes a run distinct (its recipe without the output folders), as a key shared by equal variants."""
    merged = deep_merge(base, variant.overrides)
    merged.pop("output_dir", None)
    merged.pop("cache_dir", None)
    return json.dumps(merged, sort_keys=True)


#: the table's columns: (column, task in the benchmark summary, metric)
COLUMNS = (
    ("vqa_acc", "vqa", "vqa_accuracy"),
    ("colour_acc", "vqa", "categories/colour/vqa_accuracy"),
    ("shape_acc", "vqa", "categories/shape/vqa_accuracy"),
    ("cider", "caption", "cider"),
    ("grounding_acc", "grounding", "accuracy"),
)
BENCHMARK_SPLITS = ("vqa", "caption", "grounding", "retrieval")


def column_values(summary: dict) -> dict[str, float]:
    values = {}
    for column, task, path in COLUMNS:
        entry = summary["tasks"].get(task)
        for part in path.split("/"):
            entry = entry.get(part) if isinstance(entry, dict) else None
        if entry is not None:
            values[column] = float(entry)
    return values


def train_and_evaluate(shared, recipe: Recipe, benchmark: list[dict]) -> dict:
    """One run: a fresh model of `recipe.seed` with the shared experts, pre-aligned, instruction-tuned, evaluated."""
    from .pipeline import Workspace, build_model, evaluate_benchmark, instruct, prealign

    start = time.perf_counter()
    model, processor = build_model(recipe)
    unexpected = model.load_state_dict(shared.expert_state, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"expert weights that this model lacks: {unexpected[:3]}")
    ws = Workspace(
        recipe,
        model,
        processor,
        shared.cache,
        shared.data,
        shared.keys,
        Path(recipe.output_dir),
        save_stages=False,
        track_heldout=False,
    )
    ws.output_dir.mkdir(parents=True, exist_ok=True)
    (ws.output_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))
    key = prealign_key(recipe)
    if key in shared.prealigned:  # same seed and pre-alignment as an earlier run: the same pre-aligned model
        model.load_state_dict(shared.prealigned[key])
    else:
        prealign(ws)
        shared.prealigned[key] = {name: value.clone() for name, value in model.state_dict().items()}
    instruct(ws)
    _, summary = evaluate_benchmark(ws, benchmark)
    return {"seconds": round(time.perf_counter() - start, 1), "summary": summary, **column_values(summary)}


def prealign_key(recipe: Recipe) -> str:
    """What decides the model after pre-alignment: everything but instruction tuning, evaluation and folders.
    Variants that differ only after it (top-k, MoCo) start instruction tuning from one pre-alignment per seed."""
    after = ("instruct", "eval", "ablation", "output_dir", "cache_dir")
    return json.dumps({k: v for k, v in recipe.to_dict().items() if k not in after}, sort_keys=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (rounding noise below 1e-12 reads as 0, not -0.000)."""
    mean, std = statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
    return (0.0 if abs(mean) < 1e-12 else mean), std


#: the metric compared with the full model seed by seed (same seed, same initialisation and data order)
PAIRED = "vqa_acc"


def paired_deltas(rows: list[dict]) -> dict[str, list[float]]:
    """Per variant, PAIRED minus the full model's, seed by seed (empty without a `full` row; none for the rows that
    are the full model's own run)."""
    full_row = next((row for row in rows if row["variant"] == "full"), None)
    if full_row is None:
        return {}
    full = full_row["values"].get(PAIRED)
    out = {}
    for row in rows:
        values = row["values"].get(PAIRED)
        if full and values and len(values) == len(full) and row["runs"] != full_row["runs"]:
            out[row["variant"]] = [value - base for value, base in zip(values, full, strict=True)]
    return out


def write_tables(output_dir: Path, rows: list[dict], seeds: list[int], note: str) -> None:
    """`table.csv` (mean and std columns per metric) and `table.md` (mean ± std), one row per variant, and the
    paired difference in PAIRED from the full model."""
    names = [column for column, _, _ in COLUMNS]
    deltas = paired_deltas(rows)
    with open(output_dir / "table.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        header = [f"{n}_{s}" for n in [*names, f"{PAIRED}_delta"] for s in ("mean", "std")]
        writer.writerow(["table", "variant", "seeds", *header])
        for row in rows:
            cells = []
            for values in [*(row["values"].get(name) for name in names), deltas.get(row["variant"])]:
                mean, std = mean_std(values) if values else (float("nan"),) * 2
                cells += [f"{mean:.4f}", f"{std:.4f}"]
            writer.writerow([row["table"], row["variant"], len(row["values"][names[0]]), *cells])
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds; Δ{PAIRED}: the variant minus the full model, "
        f"seed by seed (same seed, same initialisation and data order), mean ± std. {note}",
        "",
    ]
    current = None
    for row in rows:
        if row["table"] != current:
            current = row["table"]
            lines += ["", f"**{current}**", "", "| variant | " + " | ".join([*names, f"Δ{PAIRED}"]) + " |"]
            lines.append("| --- " * (len(names) + 2) + "|")
        cells = []
        for name, values in [*((n, row["values"].get(n)) for n in names), (PAIRED, deltas.get(row["variant"]))]:
            if not values:
                cells.append("-")
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:.3f} ± {std:.3f}" if name.endswith(("acc", "r@1")) else f"{mean:.2f} ± {std:.2f}")
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    (output_dir / "table.md").write_text("\n".join(lines).replace("\n\n\n", "\n\n") + "\n")


def machine() -> str:
    import os
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{device} ({platform.machine()}), torch {torch.__version__}"


def ablate(recipe: Recipe, source: str = "recipe") -> dict:
    """Every variant of `recipe.ablation.variants` (all when empty) over `recipe.ablation.seeds`, in
    `recipe.output_dir`; writes the tables and returns what they hold. `source` names the recipe in the tables."""
    from astrea.evaluation.synthetic import synthetic_rows

    from .pipeline import prepare

    output_dir, seeds, only = Path(recipe.output_dir), list(recipe.ablation.seeds), recipe.ablation.variants
    chosen = variants(recipe)
    if only:
        unknown = sorted(set(only) - {v.name for v in chosen})
        if unknown:
            raise ValueError(f"unknown variant {unknown[0]!r}; variants are {', '.join(v.name for v in chosen)}.")
        chosen = [v for v in chosen if v.name in only]
    base = recipe.to_dict()
    canonical: dict[str, str] = {}  # settings -> the variant name its results are stored under, whatever is chosen
    for variant in sorted(variants(recipe), key=lambda v: v.name != "full"):  # a shared run is stored as "full"
        canonical.setdefault(run_settings(base, variant), variant.name)
    runs = {run_settings(base, v): canonical[run_settings(base, v)] for v in chosen}
    start = time.perf_counter()
    results: dict[tuple[str, int], dict] = {}
    for settings, stored in runs.items():  # finished runs first, all checked before any training starts
        digest = hashlib.sha256(settings.encode()).hexdigest()[:16]
        for seed in seeds:
            path = output_dir / "runs" / stored / f"seed-{seed}.json"
            if path.exists():
                result = json.loads(path.read_text())
                if result.get("settings") != digest:
                    raise ValueError(
                        f"{path} holds a run made with other settings than this recipe's {stored} run; delete it "
                        f"(or {output_dir / 'runs'}) to train it again."
                    )
                results[(stored, seed)] = result
    shared = None
    for settings, stored in runs.items():
        digest = hashlib.sha256(settings.encode()).hexdigest()[:16]
        for seed in seeds:
            path = output_dir / "runs" / stored / f"seed-{seed}.json"
            if (stored, seed) in results:
                continue
            if shared is None:
                shared = _prepare_shared(recipe, output_dir, prepare)
                benchmark = [
                    row
                    for split, rows in synthetic_rows(shared.data["test"], shared.keys["test"], seed=0).items()
                    if split in BENCHMARK_SPLITS
                    for row in rows
                ]
            run_recipe = Recipe.from_dict(
                {**json.loads(settings), "seed": seed, "output_dir": str(path.parent / f"seed-{seed}")}
            )
            run_recipe.cache_dir = recipe.cache_dir
            logger.warning(f"ablation run {stored}, seed {seed}")
            result = {"variant": stored, "seed": seed, "settings": digest}
            result.update(train_and_evaluate(shared, run_recipe, benchmark))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))
            results[(stored, seed)] = result
    rows = []
    for variant in chosen:
        stored = runs[run_settings(base, variant)]
        per_seed = [results[(stored, seed)] for seed in seeds]
        values = {column: [r[column] for r in per_seed if column in r] for column, _, _ in COLUMNS}
        rows.append({"table": variant.table, "variant": variant.name, "values": values, "runs": stored})
    minutes = round((time.perf_counter() - start) / 60, 1)
    run_minutes = round(sum(result["seconds"] for result in results.values()) / 60, 1)
    shared_runs = sorted({f"{row['variant']} = {row['runs']}" for row in rows if row["runs"] != row["variant"]})
    note = (
        f"Recipe {source}; {len(runs)} distinct runs x {len(seeds)} seeds, {run_minutes} min of training and "
        f"evaluation in all (the shared set-up not counted); this invocation took {minutes} min on {machine()}."
    ) + (f" Rows that are the same run: {'; '.join(shared_runs)}." if shared_runs else "")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_tables(output_dir, rows, seeds, note)
    record = {
        "seeds": seeds,
        "minutes": minutes,
        "run_minutes": run_minutes,
        "machine": machine(),
        "rows": rows,
        "runs": len(runs) * len(seeds),
    }
    (output_dir / "ablations.json").write_text(json.dumps(record, indent=1))
    return record


@dataclass
class Shared:
    cache: object
    data: dict
    keys: dict
    expert_state: dict
    prealigned: dict = field(default_factory=dict)  # prealign_key -> state dict after pre-alignment


def _prepare_shared(recipe: Recipe, output_dir: Path, prepare) -> Shared:
    """Data, experts (pre-trained once, with the recipe's own seed) and the filled feature cache."""
    setup = Recipe.from_dict({**recipe.to_dict(), "output_dir": str(output_dir / "shared")})
    ws = prepare(setup)
    state = {k: v.clone() for k, v in ws.model.state_dict().items() if k.startswith("model.experts.")}
    return Shared(ws.cache, ws.data, ws.keys, state)


__all__ = ["COLUMNS", "PAIRED", "Variant", "ablate", "paired_deltas", "variants"]
