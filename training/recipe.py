"""Recipes: one YAML file holds a whole training run (model, data, the pre-alignment stages, instruction tuning,
evaluation). Every section is a dataclass; an unknown key or an unknown stage name is an error that names it,
raised before any work starts.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modeling_astrea import EXPERT_NAMES

#: What instruction tuning can train on (`instruct.tasks`; see collator.instruction_examples).
INSTRUCTION_TASKS = ("questions", "caption", "grounding")


@dataclass
class ModelArgs:
    config: str = "examples/configs/tiny"  # folder with an Astrea config and processor
    pretrained: str | None = None  # a model folder to start from instead of random weights
    overrides: dict[str, Any] = field(default_factory=dict)  # AstreaConfig fields
    text_overrides: dict[str, Any] = field(default_factory=dict)  # text_config fields
    detection_size: int | None = None  # Grounding DINO input side (the processor's otherwise)


@dataclass
class DataArgs:
    path: str | None = None  # a `datasets` folder (save_to_disk) in the synthetic set's format; else synthetic
    num_train: int = 2000  # synthetic training images
    num_test: int = 300  # held-out images
    num_unseen: int = 0  # held-out images drawn with renderer settings training never uses (evaluated with data.files)
    style: str = "classic"  # the synthetic set's renderer (training/data.py STYLES): "classic" or "broad"
    image_size: int = 64
    seed: int = 0
    every_object: bool = True  # training colour/shape questions about every object, not one per image
    # files in public formats (training/sources.py): [{format, path, image_root, phases, name, num_samples,
    # weight}]; with sources, the recipe trains on them instead of the synthetic set
    sources: list[dict] = field(default_factory=list)
    # a folder (relative ones under output_dir): draw the synthetic set, write it there as COCO and LLaVA files
    # (training/export.py) and train on those files as on any sources (`make demo`)
    files: str | None = None
    on_bad_row: str = "error"  # a bad row stops the run before training ("error") or is left out and counted
    max_length: int | None = None  # examples longer than this (in tokens) are bad rows; None: no limit
    # with `files`: up to this many of a training image's questions in one conversation, in a shuffled order (the
    # image's visual tokens then serve every answer in it; presence questions alone, as earlier turns would give
    # them away); 1: one per row and every eighth image's in pairs. The demo asks 4 (docs/training.md)
    turns_per_row: int = 1

    def source_args(self) -> list:
        """`sources` as checked SourceArgs (an unknown key or format names its entry)."""
        from .sources import SourceArgs

        specs = []
        for index, entry in enumerate(self.sources):
            if not isinstance(entry, dict):
                raise ValueError(f"Recipe: data.sources[{index}] must be a mapping, got {entry!r}.")
            known = {f.name for f in dataclasses.fields(SourceArgs)}
            unknown = sorted(set(entry) - known)
            missing = sorted({"format", "path"} - set(entry))
            if unknown or missing:
                what = f"unknown key {unknown[0]!r}" if unknown else f"missing {missing[0]!r}"
                raise ValueError(f"Recipe: data.sources[{index}]: {what}; the keys are {', '.join(sorted(known))}.")
            specs.append(SourceArgs(**entry))
        return specs


@dataclass
class OptimArgs:
    """What every phase shares: the paper's Sec. 4.1 defaults (AdamW 0.9/0.98, wd 0.05, cosine, 15% warm-up)."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.15
    batch_size: int = 128  # per device
    gradient_accumulation_steps: int = 1
    save_steps: int = 500
    logging_steps: int = 10
    bf16: bool = False
    gradient_checkpointing: bool = False
    # torch.compile each LLM decoder layer (dynamic shapes) for this phase's training steps: the tiny recipe's
    # instruction tuning ran 4.6 -> 5.8 steps/s on a 2-core CPU after a compile of some seconds (docs/training.md)
    compile_language_model: bool = False
    # batches of examples of about the same length (each example's token count, image tokens included), in a
    # random order drawn from the seed and the epoch: less padding, the same examples per epoch
    group_by_length: bool = False
    # the LLM reads each batch's rows packed into as few sequences as hold them, each row seeing only itself: the
    # same loss and gradients up to rounding, no compute spent on padding (`pack_rows`, docs/training.md)
    pack_rows: bool = False
    # processes that read and collate the next batches while this one trains (the Trainer's dataloader_num_workers):
    # 0 collates between steps; a GPU run on real data wants several. The same batches and random numbers either way
    dataloader_num_workers: int = 0


@dataclass
class PrealignArgs(OptimArgs):
    order: list[str] = field(default_factory=lambda: list(EXPERT_NAMES))  # coarse to fine (Table 6)
    joint: bool = False  # all experts in one stage ("Cap -> All")
    residual: bool = True  # random residual attention (Eq. 2-4; Table 4)
    stage_steps: list[int] = field(default_factory=lambda: [2000, 500, 200, 200])  # paper's proportions (k steps)
    train_language_model: bool = False  # the paper trains only the projector (and residual) per stage


@dataclass
class InstructArgs(OptimArgs):
    steps: int = 500
    lora: bool = False  # PEFT LoRA on the LLM instead of full tuning
    lora_rank: int = 16
    lora_alpha: int = 32
    use_moco: bool = True  # Eq. 11; Table 4
    router_top_k: int = 3  # Table 3
    train_projectors: bool = False  # the paper keeps them frozen after pre-alignment
    tasks: list[str] = field(default_factory=lambda: ["questions"])  # + "caption", "grounding" (collator.py)
    # MoCo's text for an image is its caption where the data has one (a COCO captions or LLaVA-Pretrain source with
    # the same image file, or the synthetic set's caption), else the row's own instructions and answers
    moco_captions: bool = True
    # up to this many conversations about the same image share one row, as branches after the image that cannot
    # see each other (collator.py): the image's visual tokens pass through the LLM once for all of them. 1: off
    image_branches: int = 1
    # a curriculum for a question the mix does not teach: after the `steps` of the mix, `focus_steps` on the
    # single-question conversations whose question contains `focus_text` alone (stage instruct-focus), then
    # `refocus_steps` of the mix again (stage instruct-mix) so the other questions come back. 0: off
    focus_text: str | None = None
    focus_steps: int = 0
    refocus_steps: int = 0


@dataclass
class ExpertPretrainArgs:
    """Stand-in for released expert checkpoints (tiny recipe only); see expert_pretraining.py."""

    steps: int = 0
    # an expert's own step count, in place of `steps` (the tiny Grounding DINO costs four times the others a step)
    expert_steps: dict[str, int] = field(default_factory=dict)
    learning_rate: float = 1e-3
    batch_size: int = 64
    num_images: int = 2000
    # experts that also learn colour; the others learn shapes only (detectors and segmenters see objects, not paint)
    colour_experts: list[str] = field(default_factory=lambda: list(EXPERT_NAMES))
    # weight of each cell's row and column as extra targets for every expert (real encoders' features carry
    # position); 1.0 in the tiny recipe cost the detector and the segmenter most of their shape accuracy
    positions: float = 0.0

    def steps_for(self, expert: str) -> int:
        return self.expert_steps.get(expert, self.steps)

    @property
    def trains(self) -> bool:
        """Whether any expert gets a pre-training step."""
        return any(self.steps_for(name) > 0 for name in EXPERT_NAMES)


@dataclass
class EvalArgs:
    batch_size: int = 64
    max_new_tokens: int = 8


@dataclass
class AblationArgs:
    """`astrea-train ablate` (see ablation.py): the seeds every variant runs with, and which variants."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=list)  # names as in table.csv; empty: all


@dataclass
class Recipe:
    output_dir: str = "outputs/run"
    cache_dir: str = "outputs/feature-cache"
    cache_dtype: str = "float16"  # how the feature cache stores expert features: float16, bfloat16 or float32
    cache_shard_mb: float = 1024  # the feature cache's shard size
    seed: int = 0
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    expert_pretraining: ExpertPretrainArgs = field(default_factory=ExpertPretrainArgs)
    prealign: PrealignArgs = field(default_factory=PrealignArgs)
    instruct: InstructArgs = field(default_factory=InstructArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    ablation: AblationArgs = field(default_factory=AblationArgs)

    def __post_init__(self):
        self.data.source_args()
        if self.data.on_bad_row not in ("error", "skip"):
            raise ValueError(f"Recipe: data.on_bad_row is {self.data.on_bad_row!r}; use error or skip.")
        from .data import STYLES

        if self.data.style not in STYLES:
            styles = " or ".join(STYLES)
            raise ValueError(f"Recipe: data.style is {self.data.style!r}; use {styles} (training/data.py).")
        if self.data.num_unseen < 0:
            raise ValueError(f"Recipe: data.num_unseen must be 0 or more, not {self.data.num_unseen}.")
        if self.data.num_unseen and not self.data.files:
            raise ValueError("Recipe: data.num_unseen is evaluated from the files data.files writes; set data.files.")
        if not isinstance(self.data.turns_per_row, int) or self.data.turns_per_row < 1:
            turns = self.data.turns_per_row
            raise ValueError(f"Recipe: data.turns_per_row must be a whole number, 1 or more, not {turns!r}.")
        if self.data.turns_per_row > 1 and not self.data.files:
            raise ValueError("Recipe: data.turns_per_row shapes the conversations data.files writes; set data.files.")
        if self.data.sources and self.data.files:
            raise ValueError("Recipe: data.files writes the synthetic set as the sources; give it or data.sources.")
        if self.data.sources and self.expert_pretraining.trains and not self.model.pretrained:
            raise ValueError(
                "Recipe: expert_pretraining trains the tiny experts on the synthetic set; with data.sources start "
                "from pretrained experts (model.pretrained) or set expert_pretraining.steps: 0 (and every "
                "expert_steps entry 0)."
            )
        if self.cache_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"Recipe: cache_dtype is {self.cache_dtype!r}; use float16, bfloat16 or float32.")
        if self.cache_shard_mb <= 0:
            raise ValueError(f"Recipe: cache_shard_mb must be positive, not {self.cache_shard_mb}.")
        unknown = [name for name in self.prealign.order if name not in EXPERT_NAMES]
        if unknown:
            raise ValueError(f"Recipe: unknown stage {unknown[0]!r} in prealign.order; stages are {EXPERT_NAMES}.")
        unknown = [name for name in self.expert_pretraining.colour_experts if name not in EXPERT_NAMES]
        if unknown:
            raise ValueError(
                f"Recipe: unknown expert {unknown[0]!r} in expert_pretraining.colour_experts; "
                f"experts are {EXPERT_NAMES}."
            )
        for name, steps in self.expert_pretraining.expert_steps.items():
            if name not in EXPERT_NAMES:
                raise ValueError(
                    f"Recipe: unknown expert {name!r} in expert_pretraining.expert_steps; experts are {EXPERT_NAMES}."
                )
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
                raise ValueError(
                    f"Recipe: expert_pretraining.expert_steps.{name} must be a whole number of steps, 0 or more; "
                    f"got {steps!r}."
                )
        if len(set(self.prealign.order)) != len(self.prealign.order):
            raise ValueError(f"Recipe: prealign.order repeats a stage: {self.prealign.order}.")
        if not self.prealign.joint and len(self.prealign.stage_steps) != len(self.prealign.order):
            raise ValueError(
                f"Recipe: prealign.stage_steps has {len(self.prealign.stage_steps)} entries for "
                f"{len(self.prealign.order)} stages."
            )
        unknown = [task for task in self.instruct.tasks if task not in INSTRUCTION_TASKS]
        if unknown or not self.instruct.tasks:
            raise ValueError(
                f"Recipe: instruct.tasks {self.instruct.tasks} must be a non-empty list of {INSTRUCTION_TASKS}."
            )
        seeds = self.ablation.seeds
        if not isinstance(self.ablation.variants, list) or not all(isinstance(v, str) for v in self.ablation.variants):
            raise ValueError(f"Recipe: ablation.variants must be a list of names, got {self.ablation.variants!r}.")
        if not isinstance(seeds, list):
            raise ValueError(f"Recipe: ablation.seeds must be a list of integers, got {seeds!r}.")
        if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"Recipe: ablation.seeds must be distinct integers, at least one; got {seeds}.")
        branches = self.instruct.image_branches
        if not isinstance(branches, int) or isinstance(branches, bool) or branches < 1:
            raise ValueError(f"Recipe: instruct.image_branches must be a whole number, 1 or more, not {branches!r}.")
        for phase in ("prealign", "instruct"):  # (that it is an integer, the file's reader checks)
            if getattr(self, phase).dataloader_num_workers < 0:
                raise ValueError(f"Recipe: {phase}.dataloader_num_workers must be 0 or more.")
        spec = self.instruct
        for key in ("focus_steps", "refocus_steps"):
            value = getattr(spec, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Recipe: instruct.{key} must be a whole number, 0 or more, not {value!r}.")
        if spec.focus_steps and not (isinstance(spec.focus_text, str) and spec.focus_text.strip()):
            raise ValueError("Recipe: instruct.focus_steps needs instruct.focus_text, the text its questions contain.")
        if spec.refocus_steps and not spec.focus_steps:
            raise ValueError("Recipe: instruct.refocus_steps returns to the mix after a focus: set focus_steps too.")
        if spec.focus_steps and spec.lora:
            raise ValueError("Recipe: instruct.focus_steps works on the whole LLM; it does not combine with lora.")
        if not 1 <= self.instruct.router_top_k <= len(EXPERT_NAMES):
            raise ValueError(f"Recipe: instruct.router_top_k={self.instruct.router_top_k} must be in 1..4.")

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> "Recipe":
        return _build(cls, data or {}, source, "")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> "Recipe":
        """A recipe file. `extends: OTHER.yaml` (relative to the file) starts from another recipe and overrides
        what this file lists, nested mappings merged key by key; then each `SECTION.KEY=VALUE` of `overrides`
        (the command line's `--set`) replaces one field."""
        return cls.from_dict(apply_overrides(_read_yaml(Path(path), seen=()), overrides), str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise ValueError(f"Recipe file {path} does not exist.")
    if path.resolve() in seen:
        raise ValueError(f"Recipe file {path} extends itself (through {' -> '.join(str(p) for p in seen)}).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"Recipe file {path} is not valid YAML: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"Recipe file {path} must hold a mapping of sections, got {type(data).__name__}.")
    data = data or {}
    base = data.pop("extends", None)
    if base is None:
        return data
    return deep_merge(_read_yaml(path.parent / base, (*seen, path.resolve())), data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`data` with each `SECTION.KEY=VALUE` of `overrides` set (VALUE parsed as YAML); a malformed one is an error
    that names it. Unknown keys are left for `Recipe.from_dict` to refuse, with the recipe's own message."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set instruct.steps=100.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            reason = getattr(error, "problem", None) or error
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({reason}).") from None
        for part in reversed(key.split(".")):
            value = {part: value}
        data = deep_merge(data, value)
    return data


def deep_merge(base: dict, overrides: dict) -> dict:
    """`overrides` on top of `base`, merging nested mappings (so one field of a section can be overridden)."""
    merged = dict(base)
    for key, value in overrides.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if both_mappings else value
    return merged


def _build(cls, data: dict, source: str, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{source}: unknown key {prefix + unknown[0]!r}; the keys of {prefix.rstrip('.') or 'a recipe'} are "
            f"{', '.join(sorted(fields))}."
        )
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {prefix + name} must be a mapping, got {value!r}.")
            value = _build(type(default), value, source, f"{prefix}{name}.")
        else:
            value = _typed(value, fields[name].type, f"{source}: {prefix + name}")
        kwargs[name] = value
    return cls(**kwargs)


def _typed(value, annotation, where: str):
    """`value` checked against a field's annotation (bool, int, float, str, lists of those, dicts, optional ones).
    A float field also takes an int and a number written as text: YAML reads `1e-4` (no dot) as a string."""
    if annotation is Any:
        return value
    if isinstance(annotation, types.UnionType):
        if value is None and type(None) in annotation.__args__:
            return None
        (annotation,) = [arg for arg in annotation.__args__ if arg is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ValueError(f"{where} must be a {origin.__name__}, got {value!r}.")
        if origin is list:
            return [_typed(item, typing.get_args(annotation)[0], f"{where}[{i}]") for i, item in enumerate(value)]
        return value
    if annotation is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[annotation]
        raise ValueError(f"{where} must be {kind}, got {value!r}.")
    return value


__all__ = [
    "AblationArgs",
    "apply_overrides",
    "deep_merge",
    "DataArgs",
    "EvalArgs",
    "InstructArgs",
    "ModelArgs",
    "PrealignArgs",
    "Recipe",
]
