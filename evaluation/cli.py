"""astrea-eval: evaluate an Astrea folder on a benchmark given as local files.

    astrea-eval synthetic --output outputs/benchmarks/synthetic      # the synthetic set's splits, as files
    astrea-eval run --model outputs/demo/model --data outputs/benchmarks/synthetic/all.jsonl \\
        --output outputs/eval/demo                                    # predictions.jsonl + summary.json
    astrea-eval probe --model outputs/demo/model                      # what each feature says of the object under it
    astrea-eval lmms-tasks --data outputs/benchmarks/synthetic/all.jsonl --output outputs/lmms-tasks
                                                                      # the same rows as lmms-eval tasks

`--data` is a JSONL file (images relative to it) or a `datasets` folder; the format is in
astrea/evaluation/benchmark.py and docs/evaluation.md.
"""

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="astrea-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="evaluate a model folder on a benchmark")
    run.add_argument("--model", required=True, help="Astrea model folder (config, weights, processor)")
    run.add_argument("--data", required=True, help="benchmark: a JSONL file or a datasets folder")
    run.add_argument("--split", default="test", help="split of a DatasetDict folder (default: test)")
    run.add_argument("--output", required=True, help="folder for predictions.jsonl and summary.json")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--max-new-tokens", type=int, help="for every task (default: 64 captions, 32 boxes, 16 else)")
    run.add_argument("--limit", type=int, help="only the first N rows")
    run.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    synthetic = commands.add_parser("synthetic", help="write the synthetic set's benchmark splits")
    synthetic.add_argument("--output", required=True, help="benchmark folder to write")
    synthetic.add_argument("--num-images", type=int, default=300, help="held-out images to draw (default 300)")
    synthetic.add_argument("--image-size", type=int, default=64)
    synthetic.add_argument("--seed", type=int, default=0, help="the data seed (0: the demo recipe's held-out set)")
    synthetic.add_argument("--from-dataset", help="use this datasets folder's test split instead of drawing")
    synthetic.add_argument(
        "--unseen-renderer",
        action="store_true",
        help="draw the images with renderer settings the training data never uses (training/data.py UNSEEN_STYLE)",
    )
    probe = commands.add_parser(
        "probe", help="linear probes: what the features say of the object under them (column, shape, colour)"
    )
    probe.add_argument("--model", required=True, help="Astrea model folder")
    probe.add_argument("--num-images", type=int, default=1000, help="drawn images (80%% fit the probe, 20%% score it)")
    probe.add_argument("--seed", type=int, default=123)
    probe.add_argument(
        "--question-images",
        type=int,
        default=300,
        help="drawn images whose left/right questions the model answers (0: none)",
    )
    lmms = commands.add_parser("lmms-tasks", help="write a benchmark as lmms-eval tasks (for --include_path)")
    lmms.add_argument("--data", required=True, help="benchmark: a JSONL file or a datasets folder")
    lmms.add_argument("--split", default="test", help="split of a DatasetDict folder (default: test)")
    lmms.add_argument("--output", required=True, help="folder to pass to lmms-eval's --include_path")
    lmms.add_argument("--name", default="astrea_synthetic", help="group task name; each task is <name>_<task>")
    return parser.parse_args(argv)


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--{name} must be at least 1, got {value}.")


def run(args) -> int:
    for name in ("batch-size", "max-new-tokens", "limit"):
        _positive(name, getattr(args, name.replace("-", "_")))
    if not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model {args.model} is not a model folder (no config.json).")
    from .benchmark import evaluate, load_benchmark, write_results  # heavy imports once the arguments are good

    rows = load_benchmark(args.data, args.split)[: args.limit]

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_astrea  # noqa: F401  (registers Astrea with the Auto classes)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = AutoProcessor.from_pretrained(args.model)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(device).eval()
    records, summary = evaluate(
        model, processor, rows, args.batch_size, args.max_new_tokens, progress=not args.no_progress
    )
    summary = {"model": str(args.model), "data": str(args.data), "device": device, **summary}
    folder = write_results(args.output, records, summary)
    print(json.dumps(summary["tasks"], indent=1))
    print(f"wrote {folder}/predictions.jsonl and {folder}/summary.json ({summary['seconds']} s)")
    return 0


def synthetic(args) -> int:
    _positive("num-images", args.num_images)
    _positive("image-size", args.image_size)
    from .synthetic import write_synthetic_benchmark

    if args.unseen_renderer and args.from_dataset:
        raise ValueError("--unseen-renderer draws its images; it does not go with --from-dataset.")
    written = write_synthetic_benchmark(
        args.output, args.num_images, args.image_size, args.seed, args.from_dataset, args.unseen_renderer
    )
    for name, count in written.items():
        print(f"{args.output}/{name}: {count} rows")
    return 0


def probe(args) -> int:
    if args.num_images < 10:
        raise ValueError(f"--num-images must be at least 10 (a fifth of them score the probe), got {args.num_images}.")
    if args.question_images < 0:
        raise ValueError(f"--question-images must be 0 or more, got {args.question_images}.")
    if not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model {args.model} is not a model folder (no config.json).")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_astrea  # noqa: F401  (registers Astrea with the Auto classes)

    from .probe import feature_probe, left_right_probe, left_right_table, probe_table

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)  # on the CPU
    result = feature_probe(model, processor, args.num_images, args.seed)
    print(probe_table(result))
    print(f"({result['objects']} objects; probes fitted on 80% of the images, scored on the rest)")
    if args.question_images:
        print()
        print(left_right_table(left_right_probe(model, processor, args.question_images, args.seed)))
        print("(which object's side each answer names: the question's first-named object is the one asked about)")
    return 0


def lmms_tasks(args) -> int:
    from .lmms_tasks import write_lmms_tasks

    written = write_lmms_tasks(args.data, args.output, args.name, args.split)
    for name, count in written.items():
        print(f"{args.output}/{args.name}/{name}.yaml: {count} rows")
    print(f"lmms-eval --model astrea --model_args pretrained=MODEL --include_path {args.output} --tasks {args.name}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        commands = {"run": run, "synthetic": synthetic, "probe": probe, "lmms-tasks": lmms_tasks}
        return commands[args.command](args)
    except ValueError as error:
        print(f"astrea-eval: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
