"""astrea-hub: export a trained Astrea for the Hub (weights, remote code, processor, model card) and push it.

    astrea-hub export --model outputs/demo/model --output outputs/hub/astrea-tiny --repo-id you/astrea-tiny
    astrea-hub push --folder outputs/hub/astrea-tiny --repo-id you/astrea-tiny [--private]

`export --push` does both. Pushing needs a token (`huggingface-cli login`, HF_TOKEN or --token).
"""

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="astrea-hub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a Hub-ready folder with a model card")
    export.add_argument("--model", required=True, help="the trained model folder (e.g. outputs/demo/model)")
    export.add_argument("--output", required=True, help="the folder to write")
    export.add_argument("--repo-id", help="Hub repository id, used in the card (default: the folder's name)")
    export.add_argument(
        "--results", nargs="+", help="metrics.json / astrea-eval summary.json files (default: the run's metrics.json)"
    )
    export.add_argument("--recipe", help="the run's recipe.json (default: next to the model folder)")
    export.add_argument("--router-plot", help="router.png (default: next to the model folder)")
    export.add_argument("--license", help="licence for the card's metadata (default: from the parts)")
    export.add_argument("--title", help="the card's title")
    export.add_argument("--max-shard-size", default="5GB")
    export.add_argument("--push", action="store_true", help="upload the folder afterwards (needs --repo-id)")
    export.add_argument("--private", action="store_true")
    export.add_argument("--token")
    push = commands.add_parser("push", help="upload an exported folder")
    push.add_argument("--folder", required=True)
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--token")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .export import export_model, push_to_hub

    try:
        if args.command == "export":
            if args.push and not args.repo_id:
                raise ValueError("--push needs --repo-id.")
            folder = export_model(
                args.model,
                args.output,
                repo_id=args.repo_id,
                results=args.results,
                recipe=args.recipe,
                router_plot=args.router_plot,
                license=args.license,
                title=args.title,
                max_shard_size=args.max_shard_size,
            )
            print(f"wrote {folder}/ (weights, remote code, processor, README.md model card)")
            if not args.push:
                return 0
        else:
            folder = args.folder
        url = push_to_hub(folder, args.repo_id, token=args.token, private=args.private)
        print(f"pushed {folder} to {url}")
    except ValueError as error:
        print(f"astrea-hub: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
