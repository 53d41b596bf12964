"""Export a trained Astrea to a folder that is ready for the Hub, with a model card, and push it.

    astrea-hub export --model outputs/demo/model --output outputs/hub/astrea-tiny --repo-id you/astrea-tiny
    astrea-hub push --folder outputs/hub/astrea-tiny --repo-id you/astrea-tiny

The folder holds safetensors shards, the config (every sub-model's config embedded, with `auto_map`), the
processor, tokenizer and chat template, the remote-code `.py` files (so `trust_remote_code=True` loads it where
this package is not installed), the router plot, and `README.md`: the model card rendered from
`templates/model_card.md.jinja` with the parts, the training recipe, the evaluation numbers and the router's
contributions that the run wrote next to the model (`recipe.json`, `metrics.json`, `router.png`).
"""

import json
import shutil
from pathlib import Path

import yaml

MODEL_CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md.jinja"

#: Licences of the parts' usual checkpoints, by Hub id prefix. Anything else: "see its model card".
KNOWN_LICENSES = {
    "lmsys/vicuna-": "llama2",
    "meta-llama/Llama-2-": "llama2",
    "google/siglip": "apache-2.0",
    "IDEA-Research/grounding-dino-": "apache-2.0",
    "facebook/sam2": "apache-2.0",
    "xinyu1205/recognize-anything-plus-model": "apache-2.0",
}
ROLES = {
    "llm": "language model",
    "caption": "caption expert (SigLIP)",
    "classification": "classification expert (RAM++ tagger)",
    "detection": "detection expert (Grounding DINO)",
    "segmentation": "segmentation expert (SAM2)",
}
NEAR_CHANCE = 0.05  # a question type within this of chance is listed as a limitation


def _parameters(module) -> str:
    count = sum(p.numel() for p in module.parameters())
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.1f} M" if count >= 1e5 else f"{count:,}"


def _license(source: str | None) -> str:
    if source is None:
        return "none (random initialisation)"
    return next((lic for prefix, lic in KNOWN_LICENSES.items() if source.startswith(prefix)), "see its model card")


def part_rows(model) -> list[dict]:
    sources = model.config.base_models or {}
    modules = {"llm": model.model.language_model, **{n: e.model for n, e in model.model.experts.items()}}
    rows = []
    for name, module in modules.items():
        source = sources.get(name)
        rows.append(
            {
                "role": ROLES[name],
                "source": f"`{source}`" if source else "random initialisation",
                "cls": type(module).__name__,
                "parameters": _parameters(module),
                "license": _license(source),
            }
        )
    return rows


def recipe_summary(recipe: dict) -> str:
    pre, inst, data = recipe["prealign"], recipe["instruct"], recipe["data"]
    if pre.get("joint"):
        stages = f"all experts in one stage ({sum(pre['stage_steps'])} steps)"
    else:
        stages = " → ".join(
            f"{name} ({steps} steps)" for name, steps in zip(pre["order"], pre["stage_steps"], strict=True)
        )
    source = (
        f"the `datasets` folder `{data['path']}`"
        if data.get("path")
        else f"the project's synthetic shapes set ({data['num_train']:,} training and {data['num_test']:,} "
        "held-out images, drawn from its seed)"
    )
    tuning = "LoRA on the LLM" if inst.get("lora") else "the full LLM"
    return "\n".join(
        [
            f"- Data: {source}.",
            f"- Progressive pre-alignment (paper Sec. 3.1): {stages}; random residual attention "
            f"{'on' if pre.get('residual', True) else 'off'}; learning rate {pre['learning_rate']}, batch "
            f"{pre['batch_size']}.",
            f"- Instruction tuning (Sec. 3.2): {inst['steps']:,} steps on "
            f"{', '.join(inst.get('tasks', ['questions']))}, {tuning} with the router, adapters and MoCo head; "
            f"MoCo loss {'on' if inst['use_moco'] else 'off'}; "
            f"top-{inst['router_top_k']} routing; learning rate {inst['learning_rate']}, batch {inst['batch_size']}.",
            f"- Seed {recipe['seed']}. Saved as a file, the recipe below reruns it: `astrea-train all --recipe FILE`.",
        ]
    )


def evaluation_markdown(results: list[dict]) -> str:
    """Tables from `astrea-train` metrics (`accuracy` per question type) and `astrea-eval` summaries (`tasks`)."""
    parts = []
    for result in results:
        if "accuracy" in result:
            lines = ["Held-out accuracy per question type (`astrea-train evaluate`):", ""]
            lines += ["| question type | accuracy | chance | n |", "| --- | --- | --- | --- |"]
            for kind, value in result["accuracy"].items():
                chance, count = result["chance"][kind], result["count"][kind]
                lines.append(f"| {kind} | {value:.1%} | {chance:.1%} | {count} |")
            parts.append("\n".join(lines))
        if "tasks" in result:
            lines = [f"`astrea-eval run` on `{result.get('data', 'a benchmark')}`:", ""]
            lines += ["| task | n | metrics |", "| --- | --- | --- |"]
            for task, entry in result["tasks"].items():
                values = ", ".join(
                    f"{name} {value:.3f}" for name, value in entry.items() if name not in ("count", "categories")
                )
                lines.append(f"| {task} | {entry['count']} | {values} |")
            parts.append("\n".join(lines))
    return "\n\n".join(parts)


def router_table(metrics: dict) -> str | None:
    router = metrics.get("router")
    if not router:
        return None
    experts = list(next(iter(router.values())))
    lines = ["| question type | " + " | ".join(experts) + " |", "| --- " * (len(experts) + 1) + "|"]
    for kind, shares in router.items():
        lines.append(f"| {kind} | " + " | ".join(f"{shares[e]:.2f}" for e in experts) + " |")
    return "\n".join(lines)


def limitations(model, recipe: dict | None, results: list[dict]) -> list[str]:
    out = []
    if recipe is None:
        out.append("No training record came with this model: treat its answers as untested.")
    elif not recipe["data"].get("path"):
        out.append(
            "Trained on synthetic drawn shapes only: it has seen simple coloured shapes on simple backgrounds and "
            "questions about them, and nothing of natural images."
        )
    for result in results:
        for kind, value in result.get("accuracy", {}).items():
            if value <= result["chance"][kind] + NEAR_CHANCE:
                out.append(
                    f"{kind.capitalize()} questions are answered at chance ({value:.1%}; "
                    f"chance {result['chance'][kind]:.1%})."
                )
    if model.config.router_mode == "token":
        out.append(
            "The router weighs the experts per visual token from the image alone; it does not read the question."
        )
    out.append(
        "Grounding DINO's features are conditioned on a fixed generic prompt "
        f"(token ids {model.config.detection_prompt_ids}), not on the question."
    )
    return out


def usage_snippet(repo_id: str, question: str = "What colour is the circle?") -> str:
    return f"""import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "{repo_id}"
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()

image = Image.new("RGB", (64, 64), (230, 230, 230))
ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "{question}"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=[prompt], return_tensors="pt")
with torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))"""


def _read_json(path: Path | None) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def render_model_card(
    model,
    repo_id: str,
    recipe: dict | None = None,
    results: list[dict] | None = None,
    router_plot: str | None = None,
    license: str | None = None,
    title: str | None = None,
    description: str | None = None,
) -> str:
    import jinja2

    results = results or []
    parts = part_rows(model)
    licenses = {row["license"] for row in parts}
    if license is None:
        ours = licenses <= {"none (random initialisation)", "apache-2.0"}
        license = "apache-2.0" if ours else (licenses.pop() if len(licenses) == 1 else "other")
    text = model.config.text_config
    own = [model.model.projectors, model.model.router, model.model.adapters, model.model.residual_attention]
    own_count = sum(p.numel() for module in [*own, model.moco] for p in module.parameters())
    router = next((router_table(r) for r in results if router_table(r)), None)
    environment = jinja2.Environment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    template = environment.from_string(MODEL_CARD_TEMPLATE.read_text())
    return template.render(
        license=license,
        title=title or repo_id.split("/")[-1],
        description=description,
        base_model_ids=[s for s in (model.config.base_models or {}).values() if "/" in s and not Path(s).exists()],
        config=model.config,
        llm_description=f"{text.model_type} LLM ({text.num_hidden_layers} layers, width {text.hidden_size})",
        parts=parts,
        own_parameters=f"{own_count:,}",
        usage=usage_snippet(repo_id),
        recipe={"summary": recipe_summary(recipe), "yaml": yaml.safe_dump(recipe, sort_keys=False).strip()}
        if recipe
        else None,
        evaluation=evaluation_markdown(results),
        router={"table": router, "plot": router_plot} if router else None,
        limitations=limitations(model, recipe, results),
    )


def export_model(
    model_dir: str | Path,
    output_dir: str | Path,
    repo_id: str | None = None,
    results: list[str | Path] | None = None,
    recipe: str | Path | None = None,
    router_plot: str | Path | None = None,
    license: str | None = None,
    title: str | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write the Hub folder for the model in `model_dir`. `results` (astrea-train `metrics.json` files or
    astrea-eval `summary.json` files), `recipe` and `router_plot` default to what a training run wrote next to
    the model folder. `repo_id` names the model in the card's usage snippet."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_astrea  # noqa: F401  (registers Astrea)

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model folder (no config.json).")
    if output_dir.resolve() == model_dir.resolve():
        raise ValueError("The export folder must differ from the model folder.")
    run_dir = model_dir.parent
    result_paths = [Path(p) for p in results] if results else [run_dir / "metrics.json"]
    missing = [str(p) for p in result_paths if results and not p.is_file()]
    if missing:
        raise ValueError(f"Result file {missing[0]} does not exist.")
    recipe_path = Path(recipe) if recipe else run_dir / "recipe.json"
    if recipe and not recipe_path.is_file():
        raise ValueError(f"Recipe file {recipe_path} does not exist.")
    plot = Path(router_plot) if router_plot else run_dir / "router.png"
    if router_plot and not plot.is_file():
        raise ValueError(f"Router plot {plot} does not exist.")

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(output_dir)
    plot_name = None
    if plot.is_file():
        plot_name = "router.png"
        shutil.copyfile(plot, output_dir / plot_name)
    card = render_model_card(
        model,
        repo_id or output_dir.name,
        recipe=_read_json(recipe_path),
        results=[r for r in map(_read_json, result_paths) if r is not None],
        router_plot=plot_name,
        license=license,
        title=title,
    )
    (output_dir / "README.md").write_text(card)
    return output_dir


def push_to_hub(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload an exported folder with `huggingface_hub` (creating the repository if needed); returns its URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "README.md").is_file():
        raise ValueError(f"{folder} is not an exported folder (run `astrea-hub export` first).")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload Astrea")
    return str(url)


__all__ = ["export_model", "push_to_hub", "render_model_card"]
