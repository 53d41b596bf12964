"""astrea-train: the paper's training recipe from one YAML file.

    astrea-train all --recipe training/recipes/tiny.yaml            # pre-align, instruct, evaluate
    astrea-train prealign --recipe training/recipes/tiny.yaml       # the four pre-alignment stages only
    astrea-train instruct --recipe ... --resume                     # continue an interrupted run
    astrea-train evaluate --recipe ... --model outputs/demo/model   # evaluate a model folder
    astrea-train ablate --recipe training/recipes/ablation.yaml     # Tables 3, 4, 6 over seeds (ablation.py)
    astrea-train all --recipe training/recipes/tiny.yaml --set instruct.steps=500 --set data.num_train=1000

`--set SECTION.KEY=VALUE` (repeatable) overrides one recipe field; VALUE is read as YAML (`[60, 30, 20, 20]`,
`true`, `3.0e-3`), and the result is checked like the file itself.

Multi-GPU / multi-node: the same command under `accelerate launch`, with a config from
training/recipes/accelerate/ (DDP, DeepSpeed ZeRO-2/3, FSDP), e.g.

    accelerate launch --config_file training/recipes/accelerate/deepspeed_zero2.yaml \\
        -m astrea.training.cli all --recipe training/recipes/astrea-13b.yaml
"""

import argparse
import json
import sys
from pathlib import Path

from .recipe import Recipe

PHASES = {
    "all": ("prealign", "instruct", "evaluate"),
    "prealign": ("prealign",),
    "instruct": ("instruct", "evaluate"),
    "evaluate": ("evaluate",),
    "ablate": (),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="astrea-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=sorted(PHASES), help="what to run")
    parser.add_argument("--recipe", required=True, help="recipe YAML file (see training/recipes/)")
    parser.add_argument("--resume", action="store_true", help="skip finished stages, continue from checkpoints")
    parser.add_argument("--output-dir", help="override the recipe's output_dir")
    parser.add_argument("--cache-dir", help="override the recipe's cache_dir (the expert feature cache)")
    parser.add_argument("--model", help="start from this model folder (model.pretrained)")
    parser.add_argument("--seeds", type=int, nargs="+", help="ablate: override ablation.seeds")
    parser.add_argument("--variants", nargs="+", help="ablate: only these variants (e.g. full no_moco top_k=1)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one recipe field, e.g. --set prealign.stage_steps=[60,30,20,20] (VALUE is YAML; repeatable)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = Recipe.from_yaml(args.recipe, args.overrides)
        if args.seeds or args.variants:
            ablation = {
                "seeds": args.seeds or recipe.ablation.seeds,
                "variants": args.variants or recipe.ablation.variants,
            }
            recipe = Recipe.from_dict({**recipe.to_dict(), "ablation": ablation}, args.recipe)
    except ValueError as error:
        print(f"astrea-train: {error}", file=sys.stderr)
        return 2
    if args.output_dir:
        recipe.output_dir = args.output_dir
    if args.cache_dir:
        recipe.cache_dir = args.cache_dir
    if args.model:
        recipe.model.pretrained = args.model

    if args.phase == "ablate":
        return ablate(recipe, args.recipe)

    from .pipeline import accuracy_table, run  # heavy imports after the arguments are known good

    try:
        metrics = run(recipe, PHASES[args.phase], resume=args.resume)
    except ValueError as error:
        print(f"astrea-train: {error}", file=sys.stderr)
        return 2
    if "accuracy" in metrics:
        print(accuracy_table(metrics))
    print(json.dumps({k: metrics[k] for k in ("minutes", "feature_cache") if k in metrics}))
    print(f"wrote {recipe.output_dir}/ (model/, metrics.json, router.png, stages.png)")
    return 0


def ablate(recipe: Recipe, source: str) -> int:
    from .ablation import ablate as run_ablation

    try:
        record = run_ablation(recipe, source)
    except ValueError as error:
        print(f"astrea-train: {error}", file=sys.stderr)
        return 2
    print((Path(recipe.output_dir) / "table.md").read_text())
    print(f"{record['runs']} runs in {record['minutes']} min; wrote {recipe.output_dir}/table.md, table.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
