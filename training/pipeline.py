"""The paper's recipe end to end: data, feature cache, progressive pre-alignment, instruction tuning, evaluation.

Each stage is a TRL `SFTTrainer` run over examples whose expert features come from the feature cache, so the
expert backbones run once per image for the whole recipe. Every stage writes its own folder under
`<output_dir>/stages/` (Trainer checkpoints, the model after the stage, and `stage.json` with its history); with
`resume=True` finished stages are loaded instead of rerun, and an interrupted stage continues from its last
checkpoint (optimizer, scheduler and RNG states included). The tiny recipe's pre-trained experts are kept in
`<output_dir>/pretrained_experts.safetensors` for the same purpose.
"""

import dataclasses
import io
import json
import math
import os
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image as PILImage
from transformers import AutoProcessor, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from astrea.processing import AstreaImageProcessor
from astrea.processing.image_processing_astrea import load_rgb_image
from modeling_astrea import EXPERT_NAMES, AstreaConfig, AstreaForConditionalGeneration
from modeling_astrea.modeling_astrea import AstreaAlignment

from .collator import (
    IMAGE_MARKER,
    VIDEO_MARKER,
    AstreaCollator,
    annotation_target,
    as_conversation,
    instruction_examples,
    prealign_examples,
    question_examples,
)
from .data import build_dataset, chance_levels, question_type
from .expert_pretraining import pretrain_experts
from .export import export_synthetic, synthetic_sources
from .feature_cache import FeatureCache, image_key, process_rank
from .recipe import InstructArgs, OptimArgs, Recipe, deep_merge
from .sources import PHASES, BadRows, SourceArgs, read_source

logger = logging.get_logger(__name__)


# --- model, data and cache ---------------------------------------------------------------------------------


def build_model(recipe: Recipe):
    """The model (random or `model.pretrained`) and its processor, with the recipe's overrides applied."""
    spec = recipe.model
    processor = AutoProcessor.from_pretrained(spec.pretrained or spec.config)
    overrides = {**spec.overrides, "text_config": {**spec.overrides.get("text_config", {}), **spec.text_overrides}}
    if spec.pretrained:
        # the overrides apply to a model folder's config too (`--model DIR --set model.overrides.X=...`): weights
        # that a new field adds start as a fresh model's do, and one whose shape changes is refused by the loader
        config = AstreaConfig.from_pretrained(spec.pretrained)
        config = AstreaConfig.from_dict(deep_merge(config.to_dict(), overrides))
        try:
            model = AstreaForConditionalGeneration.from_pretrained(spec.pretrained, config=config)
        except RuntimeError as error:
            if "mismatch" not in str(error):
                raise
            raise ValueError(
                f"model.overrides / model.text_overrides change the shape of weights in {spec.pretrained} (the "
                "loader's report above names them): leave out the fields that do, or start from model.config instead"
            ) from None
    else:
        config = AstreaConfig.from_pretrained(spec.config)
        if not recipe.prealign.joint:  # a residual attention for every stage after the first, in this order
            overrides.setdefault("residual_experts", list(recipe.prealign.order[1:]))
        config = AstreaConfig.from_dict(deep_merge(config.to_dict(), overrides))
        torch.manual_seed(recipe.seed)
        model = AstreaForConditionalGeneration(config)
        # the experts' input sizes follow the (possibly overridden) config
        detection = spec.detection_size or processor.image_processor.expert_sizes["detection"]
        processor.image_processor = AstreaImageProcessor.from_model_config(config, detection_size=detection)
    processor.num_image_tokens = model.config.num_image_tokens
    return model, processor


@dataclass
class Workspace:
    """What all phases share."""

    recipe: Recipe
    model: AstreaForConditionalGeneration
    processor: object
    cache: FeatureCache
    data: dict | None  # {"train": rows, "test": rows}: the synthetic set's rows without the image column
    keys: dict | None  # {"train": [image content hash per row], "test": [...]}
    output_dir: Path
    resume: bool = False
    callbacks: list = field(default_factory=list)
    save_stages: bool = True  # each stage's model in its folder (what `resume` reloads)
    track_heldout: bool = True  # held-out measures during each stage, for stages.png
    records: dict | None = None  # with data.sources: {phase: records (sources.py), each with its images' "keys"}

    @property
    def collator(self) -> AstreaCollator:
        return AstreaCollator(self.processor, self.cache)


def prepare(recipe: Recipe, resume: bool = False, callbacks=None) -> Workspace:
    from accelerate import PartialState

    # under `accelerate launch`, the process group before anything shared on disk: the data files are written by
    # rank 0 alone and the feature cache is filled in shares (without it every process was rank 0 of 1, and one
    # process's cleanup of "its" unfinished shards deleted the other's)
    PartialState()
    output_dir = Path(recipe.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    specs, dataset = recipe.data.source_args(), None
    if recipe.data.files:  # the synthetic set, written out as COCO and LLaVA files and read back like any data
        files = output_dir / recipe.data.files  # (an absolute path stays as it is)
        dataset = load_data(recipe)
        if process_rank()[0] == 0:
            export_synthetic(dataset, files, recipe.data.image_size, recipe.seed, recipe.data.turns_per_row)
        if process_rank()[1] > 1:
            torch.distributed.barrier()
        specs = [SourceArgs(**spec) for spec in synthetic_sources(files, unseen="unseen" in dataset)]
    records = read_sources(recipe, specs)  # before the model: a missing file or a bad row stops the run here
    if records is None:
        dataset = load_data(recipe)
    model, processor = build_model(recipe)
    if recipe.expert_pretraining.trains and not recipe.model.pretrained:
        tiny_experts(recipe, model, processor, dataset, output_dir / EXPERTS_FILE, resume)
    cache = open_cache(recipe, model, processor)
    ws = Workspace(recipe, model, processor, cache, None, None, output_dir, resume, list(callbacks or []))
    if records is not None:
        ws.records = attach_image_keys(ws, records)
        check_lengths(ws)
        return ws
    ws.data, ws.keys = {}, {}
    for split in ("train", "test"):
        ws.keys[split] = []
        images = decoded_images(dataset[split], split, ws.keys[split])
        stats = cache.fill(model, processor.image_processor, images, desc=f"expert features ({split})")
        logger.warning(f"feature cache, {split} split: {stats}")
        ws.data[split] = dataset[split].remove_columns("image")
    return ws


#: the tiny recipe's pre-trained experts, beside the run's stages: what `--resume` (and every process but the first)
#: loads instead of pre-training them again, which on another machine or thread count gives other weights
EXPERTS_FILE = "pretrained_experts.safetensors"


def tiny_experts(recipe: Recipe, model, processor, dataset, path: Path, resume: bool) -> None:
    """Give `model` the tiny recipe's pre-trained experts (`expert_pretraining`): pre-trained by the first process
    and written to `path`, or loaded from `path` where a resumed run (or the first process) wrote them, so every
    stage of a run, resumed or not, and every process, sees the same experts."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    spec = recipe.expert_pretraining
    # what decides the experts' weights (their training, its data and the model): a resumed run whose recipe
    # changes any of it pre-trains them again
    made_by = json.dumps(
        {
            "expert_pretraining": dataclasses.asdict(spec),
            "seed": recipe.seed,
            "data": dataclasses.asdict(recipe.data),
            "model": dataclasses.asdict(recipe.model),
        },
        sort_keys=True,
    )
    rank, world = process_rank()
    load = [False]
    if rank == 0 and resume:  # the first process decides for all: each checking the file itself could race its write
        if path.is_file():
            with safe_open(path, "pt") as saved:
                load[0] = (saved.metadata() or {}).get("made_by") == made_by
            if load[0]:
                logger.warning(f"tiny experts: loading those the interrupted run pre-trained ({path})")
            else:
                logger.warning(f"tiny experts: {path} was made by another recipe; pre-training them again")
        elif (path.parent / "stages").is_dir():
            logger.warning(
                f"tiny experts: no {path.name} in the resumed run (one from before it was written); pre-training them "
                "again, which on another machine or thread count gives other experts than its stages were aligned with"
            )
    if world > 1:
        torch.distributed.broadcast_object_list(load, src=0)
    if not load[0]:
        if rank == 0:
            pretrain_experts(
                model,
                processor.image_processor,
                dataset["train"],
                spec.steps,
                spec.learning_rate,
                spec.batch_size,
                spec.num_images,
                recipe.seed,
                spec.colour_experts,
                spec.positions,
                spec.expert_steps,
            )
            experts = model.model.experts.state_dict()
            state = {f"model.experts.{k}": v.detach().contiguous().clone() for k, v in experts.items()}
            partial = path.with_name(path.name + ".partial")  # a run killed while writing leaves no half file
            save_file(state, partial, metadata={"made_by": made_by})
            os.replace(partial, path)
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            return
        logger.warning(f"tiny experts: process {rank} loads those process 0 pre-trained ({path})")
    result = model.load_state_dict(load_file(path), strict=False)
    missing = [key for key in result.missing_keys if key.startswith("model.experts.")]
    if result.unexpected_keys or missing:
        what = f"weights this model does not have: {result.unexpected_keys[:5]}" if result.unexpected_keys else ""
        what = what or f"no weights for {missing[:5]}"
        raise ValueError(f"{path} holds {what}")


REQUIRED_COLUMNS = ("image", "caption", "tags", "boxes", "labels", "masks", "questions")


def load_data(recipe: Recipe):
    """The recipe's data: a `datasets` folder with train/test splits, or the synthetic set drawn here."""
    spec = recipe.data
    if spec.path is None:
        return build_dataset(
            spec.num_train, spec.num_test, spec.image_size, spec.seed, spec.every_object, spec.num_unseen, spec.style
        )
    from datasets import load_from_disk

    if not Path(spec.path).exists():
        raise ValueError(f"data.path {spec.path} does not exist.")
    dataset = load_from_disk(spec.path)
    for split in ("train", "test"):
        if split not in dataset:
            raise ValueError(f"data.path {spec.path} has no {split!r} split.")
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset[split].column_names]
        if missing:
            raise ValueError(f"data.path {spec.path}, split {split}: missing columns {missing}.")
    return dataset


def open_cache(recipe: Recipe, model, processor) -> FeatureCache:
    return FeatureCache.for_model(
        recipe.cache_dir, model, processor.image_processor, dtype=recipe.cache_dtype, shard_mb=recipe.cache_shard_mb
    )


def read_sources(recipe: Recipe, specs: list[SourceArgs]) -> dict | None:
    """{phase: records} of these sources (None without sources). The annotation records of one image from
    several sources (COCO captions and instances of the same images) become one. Bad rows stop the run here or
    are left out (`data.on_bad_row`)."""
    if not specs:
        return None
    bad = BadRows(recipe.data.on_bad_row)
    records = {phase: [] for phase in PHASES}
    for spec in specs:
        rows = read_source(spec, bad)
        for phase in spec.phases:
            records[phase].extend(rows)
    for phase in ("prealign", "eval"):
        merged, others = {}, []
        for record in records[phase]:
            if "image" not in record:  # a conversation
                others.append(record)
                continue
            key = record["image"] if isinstance(record["image"], str) else id(record)
            if key in merged:
                entry = merged[key]
                entry["caption"] = entry["caption"] or record["caption"]
                if not entry["labels"] and record["labels"]:
                    entry.update({k: record[k] for k in ("tags", "labels", "boxes", "masks", "width", "height")})
            else:
                merged[key] = dict(record)
        records[phase] = list(merged.values()) + others
    bad.finish()
    counts = {phase: len(rows) for phase, rows in records.items()}
    logger.warning(f"data sources: {counts} records per phase")
    if not records["prealign"] and not records["instruct"]:
        raise ValueError("data.sources feed neither prealign nor instruct: nothing to train on.")
    return records


def attach_image_keys(ws: Workspace, records: dict) -> dict:
    """Decode every record's images once (by path, or the `datasets` value), fill the feature cache with them, and
    give each record its images' content hashes ("keys"). An image that does not decode is a bad row."""
    bad = BadRows(ws.recipe.data.on_bad_row)
    keys: dict = {}  # image ref -> content hash, or None when it does not decode

    def refs(record: dict) -> list:
        return record["images"] if "images" in record else [record["image"]]

    def ref_id(ref):
        return ref if isinstance(ref, str) else id(ref)

    def images():
        for phase_records in records.values():
            for record in phase_records:
                for ref in refs(record):
                    if ref_id(ref) in keys:
                        continue
                    try:
                        image = load_rgb_image(open_image_ref(ref))
                    except (ValueError, OSError, TypeError) as error:
                        keys[ref_id(ref)] = None
                        bad.add(record["source"], record["id"], "image", f"does not decode ({error})")
                        continue
                    keys[ref_id(ref)] = image_key(image)
                    yield image

    stats = ws.cache.fill(ws.model, ws.processor.image_processor, images(), desc="expert features")
    logger.warning(f"feature cache: {stats}")
    bad.finish()  # stops here (before any training) unless bad rows are skipped
    out = {}
    for phase, phase_records in records.items():
        kept = []
        for record in phase_records:
            record_keys = [keys[ref_id(ref)] for ref in refs(record)]
            if all(key is not None for key in record_keys):
                kept.append({**record, "keys": record_keys})
        out[phase] = kept
    return out


def open_image_ref(ref):
    """A path or PIL image as it is; a `datasets` image value ({"bytes", "path"}) opened."""
    if isinstance(ref, dict):
        return PILImage.open(io.BytesIO(ref["bytes"])) if ref.get("bytes") is not None else ref["path"]
    return ref


def conversation_examples(records: list[dict]) -> list[dict]:
    """Collator examples of conversation records; `type` (what evaluation groups by): the row's question type, or
    its source's name."""
    return [
        {
            "keys": r["keys"],
            "messages": r["messages"],
            "frames": r.get("frames", []),
            "type": r.get("type", r["source"]),
            **({"subgroup": r["subgroup"]} if "subgroup" in r else {}),
        }
        for r in records
    ]


def image_bundles(examples: list[dict], branches: int, seed: int) -> list[dict]:
    """Examples as rows of up to `branches` conversations each (`instruct.image_branches`): the conversations about
    one image (in a random order drawn from `seed`) bundled `branches` at a time, each bundle an example with
    `branches` that the collator writes as one row in which the image passes through the LLM once for all of
    them; conversations without exactly one image (text-only, several images, video) stay rows of their own.
    Every example comes back in that form (`keys`, `branches`, `frames`, `type`: the first conversation's)."""
    rng = random.Random(seed)
    by_image: dict[str, list[dict]] = defaultdict(list)
    bundles = []
    for example in examples:
        keys, messages, frames = as_conversation(example)
        if len(keys) == 1 and not frames:
            by_image[keys[0]].append({"messages": messages, "type": example.get("type")})
        else:
            bundles.append({"keys": keys, "branches": [messages], "frames": list(frames), "type": example.get("type")})
    for key, conversations in by_image.items():
        rng.shuffle(conversations)
        for start in range(0, len(conversations), branches):
            part = conversations[start : start + branches]
            bundles.append(
                {"keys": [key], "branches": [c["messages"] for c in part], "frames": [], "type": part[0]["type"]}
            )
    return bundles


def with_moco_captions(examples: list[dict], captions: dict[str, str]) -> list[dict]:
    """Examples about one image that has a caption (`captions`: image key -> caption) get it as `moco_text`, MoCo's
    text for the pair (docs/design.md, MoCo): the image's description, where the row's own answers ("two", "left")
    tell little about it. Other examples keep their instructions and answers as MoCo's text (`moco_text` None: every
    example has the key, since `Dataset.from_list` takes its columns from the first example)."""
    out = []
    for example in examples:
        keys, _, frames = as_conversation(example)
        caption = captions.get(keys[0]) if len(keys) == 1 and not frames else None
        out.append({**example, "moco_text": caption or None})
    return out


def check_lengths(ws: Workspace) -> None:
    """With `data.max_length`, conversations longer than it (image tokens included) are bad rows: reported before
    training, never truncated inside an image's placeholders."""
    limit = ws.recipe.data.max_length
    if limit is None:
        return
    bad = BadRows(ws.recipe.data.on_bad_row)
    collator = ws.collator
    for phase in ("instruct", "eval"):
        kept = []
        for record in ws.records[phase]:
            length = collator.length(conversation_examples([record])[0])
            if length > limit:
                problem = f"{length} tokens, over data.max_length {limit}"
                bad.add(record["source"], record["id"], "conversations", problem)
            else:
                kept.append(record)
        ws.records[phase] = kept
    bad.finish()


def decoded_images(split_data, split: str, keys: list[str]):
    """Decode every row's image (checked: a missing or undecodable image names its row), recording content
    hashes in `keys` as it goes."""

    from datasets import Image as ImageFeature

    raw = split_data.cast_column("image", ImageFeature(decode=False))["image"]
    for index, item in enumerate(raw):
        if item is None or (item.get("bytes") is None and item.get("path") is None):
            raise ValueError(f"{split} row {index} has no image.")
        try:
            image = load_rgb_image(open_image_ref(item), index)
        except (ValueError, OSError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{split} row {index}: its image does not decode ({error}).") from None
        keys.append(image_key(image))
        yield image


# --- training ----------------------------------------------------------------------------------------------


class MomentumUpdate(TrainerCallback):
    """MoCo's EMA update (Eq. 8) once per optimizer step, however many forwards the step accumulates, at the step's
    start (before its keys), outside any forward: on every process, whether or not its batch has image-text pairs,
    and on the weights as the backend holds them (gathered under ZeRO-3, the shards under FSDP2)."""

    def __init__(self, model):
        self.config, self.moco, self.base = model.config, model.moco, model.model

    def on_train_begin(self, args, state, control, **kwargs):
        self.moco.update_in_forward = False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.config.use_moco and self.base.alignment is None:  # pre-alignment has no MoCo term
            self.moco.momentum_update()

    def on_train_end(self, args, state, control, **kwargs):
        self.moco.update_in_forward = True


class ShuffledLengthGroups(LengthGroupedSampler):
    """Length-grouped batches (transformers' grouping: sorted by length within groups of up to 50 batches) in a
    random order, drawn from (seed, epoch) alone: the same order on every process and again after a resume.
    transformers' own sampler draws from the process's global random state and leaves each group's batches longest
    first, so that a run of steps sees one length, which in the demo's data is one question type."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at every epoch's start
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return iter([index for b in order for index in batches[b]])


class AstreaSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the model's own: L_reg + mu * L_moco (Eq. 11), with both parts logged.

    TRL's default loss scores the LM head on the backbone alone, which would bypass Astrea's MoCo term. Under
    gradient accumulation the model gets the Trainer's `num_items_in_batch` (label tokens of the whole accumulated
    batch, over every process with `average_tokens_across_devices`) and returns its share of the batch's loss, so
    that the accumulated gradient is the one-batch gradient; MoCo's momentum head is updated once per optimizer
    step (MomentumUpdate). With `pack_rows` the LLM reads each batch's rows packed (`AstreaModel.forward`)."""

    def __init__(self, *args, callbacks=None, pack_rows: bool = False, **kwargs):
        model = kwargs["model"]
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
        self.pack_rows = pack_rows
        super().__init__(*args, callbacks=[MomentumUpdate(base), *(callbacks or [])], **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        column = self.args.length_column_name  # "length", what run_stage writes
        grouped = self.args.train_sampling_strategy == "group_by_length"
        if not grouped or column not in getattr(dataset, "column_names", ()):
            return super()._get_train_sampler(train_dataset)
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ShuffledLengthGroups(batch, dataset[column], seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        if self.pack_rows:
            extra["pack_rows"] = True
        # training needs the loss alone: the LM head runs only where a label is scored (evaluation keeps the logits)
        outputs = model(**inputs, use_cache=False, skip_logits=model.training, **extra)
        mode = "train" if model.training else "eval"
        for name in ("loss_reg", "loss_moco", "moco_chance", "loss_balance"):
            value = getattr(outputs, name, None)
            if value is None:
                continue
            value = value.detach().float()
            if name == "loss_reg" and num_items_in_batch is not None:  # logged as this micro-batch's token mean
                tokens = (inputs["labels"][..., 1:] != -100).sum().clamp(min=1)
                value = value * num_items_in_batch / tokens
            self._metrics[mode][name].append(value.item())
        loss = outputs.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # the count spans every process; DDP averages gradients
        return (loss, outputs) if return_outputs else loss


class HistoryCallback(TrainerCallback):
    """Training loss per logging step, and a held-out measure every `every` steps (for stages.png)."""

    def __init__(self, measure, every: int):
        self.measure, self.every = measure, max(1, every)
        self.loss: list[tuple[int, float]] = []
        self.heldout: list[tuple[int, float]] = []
        self.moco: list[tuple[int, float, float]] = []  # (step, loss_moco, its chance level)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss.append((state.global_step, float(logs["loss"])))
        if logs and "loss_moco" in logs and "moco_chance" in logs:
            self.moco.append((state.global_step, float(logs["loss_moco"]), float(logs["moco_chance"])))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.measure is None:
            return
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.heldout.append((state.global_step, self.measure()))


def sft_config(args: OptimArgs, steps: int, output_dir: Path, seed: int) -> SFTConfig:
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=args.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        report_to="none",
        # the loss is the model's own (AstreaSFTTrainer.compute_loss): pinned, so that no TRL default replaces it
        loss_type="nll",
        completion_only_loss=False,
        assistant_only_loss=False,
        use_liger_kernel=False,
        average_tokens_across_devices=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        # workers started again at every epoch, not kept: each epoch's loader then draws its seed from the global
        # random state as it does without workers, so the run (and a resumed one) draws the same random numbers
        dataloader_num_workers=args.dataloader_num_workers,
        disable_tqdm=False,
    )


def set_trainable(model, modules: list[torch.nn.Module], language_model: bool) -> int:
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)
    if language_model:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    model.model.train()  # keeps frozen experts in eval mode
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def compiled_decoder_layers(model, enabled: bool = True):
    """Within the block, each of the LLM's decoder layers is compiled in place (`nn.Module.compile`: parameter names,
    saving and wrapping by accelerate stay as they are; dynamic shapes, as every batch has its own length), and eager
    again after it. Generation inside the block (the held-out measure) runs eagerly: its cache would recompile every
    layer until dynamo's recompile limit, after which training steps ran slower too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's LoRA wrapper
    layers = list(base.model.language_model.layers) if enabled else []
    before = [layer._compiled_call_impl for layer in layers]  # what nn.Module.compile replaces (None: eager)
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield
    finally:
        for layer, previous in zip(layers, before, strict=True):
            layer._compiled_call_impl = previous


def eager(function):
    """`function` with any compiled module inside it run eagerly (no compile, no recompile)."""

    def run(*args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return function(*args, **kwargs)

    return run


def run_stage(ws: Workspace, name: str, model, examples: list[dict], args: OptimArgs, steps: int, measure) -> dict:
    """One SFTTrainer run in `<output_dir>/stages/<name>`; skipped (and its result loaded) when already done."""
    from datasets import Dataset

    stage_dir = ws.output_dir / "stages" / name
    done = stage_dir / "stage.json"
    if ws.resume and done.exists():
        logger.warning(f"stage {name}: finished in an earlier run, loading it")
        load_trained(model, stage_dir)
        return json.loads(done.read_text())
    # complete checkpoints only: the Trainer writes trainer_state.json last, so a save cut short by a kill has none
    checkpoints = sorted(
        (p for p in stage_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    resume_from = str(checkpoints[-1]) if ws.resume and checkpoints else None
    history = HistoryCallback(eager(measure) if ws.track_heldout and measure else None, every=max(1, steps // 5))
    collator = ws.collator
    if args.group_by_length:  # the sampler's lengths: tokens as the collator will lay them out (memoised there)
        examples = [{**example, "length": collator.length(example)} for example in examples]
    trainer = AstreaSFTTrainer(
        model=model,
        args=sft_config(args, steps, stage_dir, ws.recipe.seed),
        train_dataset=Dataset.from_list(examples),
        data_collator=collator,
        processing_class=ws.processor.tokenizer,
        callbacks=[history, *ws.callbacks],
        pack_rows=args.pack_rows,
    )
    start = time.perf_counter()
    with compiled_decoder_layers(model, enabled=args.compile_language_model):
        trainer.train(resume_from_checkpoint=resume_from)
    record = {
        "stage": name,
        "steps": steps,
        "resumed_from": int(resume_from.rsplit("-", 1)[-1]) if resume_from else None,  # the checkpoint's step
        "seconds": round(time.perf_counter() - start, 1),
        "loss": history.loss,
        "heldout": history.heldout,
        "moco": history.moco,
        "feature_cache": ws.cache.stats(),
    }
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if ws.save_stages:
        lora = hasattr(unwrapped, "merge_and_unload")
        target = unwrapped.merge_and_unload() if lora else unwrapped
        trained = {key for key, parameter in target.named_parameters() if parameter.requires_grad}
        if lora:  # merging changed the LLM's weights, which are frozen under the adapters
            trained |= {key for key, _ in target.named_parameters() if key.startswith("model.language_model.")}
        # with the processor: a stage's folder is a whole model folder (`astrea-train instruct --model` takes it)
        save_model_folder(target, stage_dir / "model", ws.processor, trained=(stage_dir / TRAINED_FILE, trained))
        if trainer.is_world_process_zero():
            done.write_text(json.dumps(record, indent=1))
    return record


#: what a finished stage trained, beside its model folder, by the model's own parameter names: what `--resume` loads
#: for that stage (the folder's names are the checkpoint layout, which `from_pretrained` converts; loading it would
#: build a second whole model in every process)
TRAINED_FILE = "trained.safetensors"


def load_trained(model, stage_dir: Path) -> None:
    """Put a finished stage's trained weights into `model` (run before any Trainer shards it)."""
    path = stage_dir / TRAINED_FILE
    if not path.is_file():  # a stage saved before this file existed
        state = AstreaForConditionalGeneration.from_pretrained(stage_dir / "model").state_dict()
        model.load_state_dict(state)
        return
    from safetensors.torch import load_file

    unexpected = model.load_state_dict(load_file(path), strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path} holds weights this model does not have: {unexpected[:5]}")


def save_model_folder(model, folder: Path, processor=None, trained: tuple[Path, set[str]] | None = None) -> None:
    """`save_pretrained` (and the processor's) by the main process, with whole weights; with `trained`
    ((file, parameter names)), those weights also go to that file under the model's own names (`load_trained`).
    Every process must call it: under DeepSpeed ZeRO-3, whose processes each hold a slice of every weight, they
    gather the weights one tensor at a time for the main process to write (a plain `save_pretrained` would write
    the slices)."""
    from safetensors.torch import save_file
    from transformers.integrations import is_deepspeed_zero3_enabled

    rank, world = process_rank()
    state = None
    if is_deepspeed_zero3_enabled():
        import deepspeed

        state = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            partitioned = hasattr(tensor, "ds_id")
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=partitioned):
                if rank == 0:
                    state[name] = tensor.detach().to("cpu").clone()
    if rank == 0:
        model.save_pretrained(folder, state_dict=state)
        if processor is not None:
            processor.save_pretrained(folder)
        if trained is not None:
            path, names = trained
            weights = state if state is not None else model.state_dict()
            # copies: save_file refuses tensors that share memory (a tied LM head)
            save_file({key: weights[key].detach().to("cpu").contiguous().clone() for key in sorted(names)}, path)
    if world > 1:
        torch.distributed.barrier()


def prealign(ws: Workspace) -> list[dict]:
    """Progressive pre-alignment (Sec. 3.1): one stage per expert in `order`, or one joint stage."""
    recipe, model = ws.recipe, ws.model
    spec = recipe.prealign
    order = list(spec.order)
    plan = (
        [(order, spec.stage_steps[0] if len(spec.stage_steps) == 1 else sum(spec.stage_steps))]
        if spec.joint
        else [(order[: i + 1], steps) for i, steps in enumerate(spec.stage_steps)]
    )
    records = []
    for index, (experts, steps) in enumerate(plan):
        current = experts[-1]
        model.model.alignment = AstreaAlignment(tuple(experts), residual=spec.residual, joint=spec.joint)
        trainable = [model.model.projectors[name] for name in (experts if spec.joint else [current])]
        if spec.residual and not spec.joint and len(experts) > 1:
            if current not in model.model.residual_attention:
                raise ValueError(
                    f"prealign.order puts {current!r} after the first stage, but the model has residual attention "
                    f"for {list(model.model.residual_attention)} only (config.residual_experts)."
                )
            trainable.append(model.model.residual_attention[current])
        if model.model.image_position is not None:  # the tokens' positions are learnt from the first stage on
            trainable.append(model.model.image_position)
        set_trainable(model, trainable, spec.train_language_model)
        examples, heldout = stage_examples(ws, experts)
        name = f"{index + 1}-{'all' if spec.joint else current}"
        measure = (lambda heldout=heldout: token_accuracy(ws, heldout)) if heldout else None
        records.append(run_stage(ws, name, model, examples, spec, steps, measure))
    model.model.alignment = None
    return records


def stage_examples(ws: Workspace, experts: list[str]) -> tuple[list[dict], list[dict]]:
    """(training examples, held-out examples) of the pre-alignment stage covering `experts`: the synthetic set's,
    or those of the annotation records that have every target the stage needs (held out: the `eval` phase's)."""
    size = ws.recipe.data.image_size
    if ws.records is None:
        return (
            prealign_examples(ws.data["train"], ws.keys["train"], experts, size),
            prealign_examples(ws.data["test"], ws.keys["test"], experts, size)[:64],
        )

    def examples(records: list[dict]) -> list[dict]:
        out = []
        for record in records:
            if "image" in record and (target := annotation_target(record, experts)) is not None:
                out.append(
                    {"key": record["keys"][0], "prompt": target[0], "answer": target[1], "type": "+".join(experts)}
                )
        return out

    train = examples(ws.records["prealign"])
    if not train:
        raise ValueError(
            f"No pre-alignment record has the targets the stage for {experts} needs (a caption, tags, boxes, masks "
            "in turn): add a source with them (COCO instances, or pseudo-labels), or leave the stage out."
        )
    logger.warning(f"stage {'+'.join(experts)}: {len(train)} of {len(ws.records['prealign'])} images have its targets")
    return train, examples(ws.records["eval"])[:64]


def apply_lora(model, args: InstructArgs, trainable: list[torch.nn.Module]):
    """PEFT LoRA on the LLM's projections; Astrea's own modules (router, adapters, MoCo head) train in full."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    for module in trainable:  # plain modules, not modules_to_save copies, so merge_and_unload keeps them as is
        module.requires_grad_(True)
    return peft_model


def focus_examples(examples: list[dict], text: str) -> list[dict]:
    """The question-and-answer turns of `examples` whose question contains `text`, each as a conversation of its own
    about the example's images or video (their markers before the question, as evaluation asks), after the
    example's system prompt where it has one."""
    out = []
    for example in examples:
        keys, messages, frames = as_conversation(example)
        markers = f"{IMAGE_MARKER}\n" * (len(keys) - sum(frames)) + f"{VIDEO_MARKER}\n" * len(frames)
        system = [m for m in messages[:1] if m.get("role") == "system"]
        for user, assistant in zip(messages, messages[1:], strict=False):  # each turn and the next
            if user.get("role") != "user" or assistant.get("role") != "assistant":
                continue
            if not isinstance(user.get("content"), str):
                continue
            question = user["content"].replace(IMAGE_MARKER, "").replace(VIDEO_MARKER, "").strip()
            if text in question:
                out.append(
                    {
                        "keys": keys,
                        "frames": list(frames),
                        "messages": [
                            *system,
                            {"role": "user", "content": markers + question},
                            {"role": "assistant", "content": assistant["content"]},
                        ],
                        "type": example.get("type"),
                    }
                )
    return out


def instruct(ws: Workspace) -> list[dict]:
    """Instruction tuning (Sec. 3.2): router (and its prompt part), adapters, MoCo heads and the LLM (full or LoRA) on
    the conversations; with `instruct.focus_steps`, then the focus questions alone and the mix again. Returns each
    stage's record."""
    spec = ws.recipe.instruct
    model = ws.model
    torch.manual_seed(ws.recipe.seed)  # LoRA's initialisation must not depend on what ran before in this process
    model.model.alignment = None
    model.config.router_top_k = spec.router_top_k
    model.config.use_moco = spec.use_moco
    modules = [model.model.router, model.model.adapters, model.moco.head, model.moco.text_head]
    if model.model.prompt_router is not None:
        modules.append(model.model.prompt_router)
    if model.model.image_position is not None:
        modules.append(model.model.image_position)
    if spec.train_projectors:
        modules.append(model.model.projectors)
    set_trainable(model, modules, language_model=not spec.lora)
    finished = ws.resume and (ws.output_dir / "stages" / "instruct" / "stage.json").exists()
    lora = spec.lora and not finished  # a finished stage's folder already holds the merged model
    train_model = apply_lora(model, spec, modules) if lora else model
    if ws.records is None:
        examples = instruction_examples(ws.data["train"], ws.keys["train"], spec.tasks)
        captions = dict(zip(ws.keys["train"], ws.data["train"]["caption"], strict=True))
        heldout = question_examples(ws.data["test"], ws.keys["test"])
    else:
        examples = conversation_examples(ws.records["instruct"])
        captions = {r["keys"][0]: r["caption"] for r in ws.records["prealign"] if r.get("caption")}
        heldout = conversation_examples([r for r in ws.records["eval"] if "messages" in r])
        if not examples:
            raise ValueError("No data.sources row feeds instruct (a source with phases: [instruct]).")
    focus = focus_examples(examples, spec.focus_text) if spec.focus_steps else []
    if spec.focus_steps and not focus:
        raise ValueError(f"instruct.focus_text {spec.focus_text!r}: no instruction question contains it.")

    def rows(examples: list[dict]) -> list[dict]:
        if spec.image_branches > 1:
            examples = image_bundles(examples, spec.image_branches, ws.recipe.seed)
        if spec.use_moco and spec.moco_captions:
            examples = with_moco_captions(examples, captions)
        return examples

    examples = rows(examples)
    measure = (lambda: answer_accuracy(ws, heldout[:128])) if heldout else None
    records = [run_stage(ws, "instruct", train_model, examples, spec, spec.steps, measure)]
    if lora and ws.save_stages:  # the folder holds the merged model; continue with it
        ws.model = AstreaForConditionalGeneration.from_pretrained(ws.output_dir / "stages" / "instruct" / "model")
    elif lora:
        ws.model = train_model.merge_and_unload()
    if focus:
        focus_heldout = focus_examples(heldout, spec.focus_text)[:128]  # what the held-out curve follows here
        if not focus_heldout and measure:
            logger.warning("stage instruct-focus: no held-out question has the focus text; its curve is the mix's")
        focus_measure = (lambda: answer_accuracy(ws, focus_heldout)) if focus_heldout else measure
        logger.warning(f"stage instruct-focus: {len(focus)} questions contain {spec.focus_text!r}")
        records.append(run_stage(ws, "instruct-focus", ws.model, rows(focus), spec, spec.focus_steps, focus_measure))
    if focus and spec.refocus_steps:
        records.append(run_stage(ws, "instruct-mix", ws.model, examples, spec, spec.refocus_steps, measure))
    return records


# --- evaluation --------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


@torch.no_grad()
def answers(
    ws: Workspace,
    examples: list[dict],
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    token_masks: dict[str, torch.Tensor] | None = None,
):
    """Greedy answers and, per example, the router's mean expert probabilities over its images' visual tokens
    (`{"all": [experts]}`; None for a text-only example or a router-less model), features from the cache. With
    `token_masks` (image key -> which of its tokens lie under an object, `object_token_masks`), an example of one
    such image also gets the means over those tokens (`"objects"`) and over the rest (`"background"`)."""
    model, collator = ws.model, ws.collator
    batch_size = batch_size or ws.recipe.eval.batch_size
    max_new_tokens = max_new_tokens or ws.recipe.eval.max_new_tokens
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts, routers = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collator.generation_inputs(chunk)
        expert_features = batch.pop("expert_features", None)  # none when every example in the chunk is text-only
        features, encoded = None, {}
        if expert_features is not None:
            features = model.get_image_features(
                expert_features={k: v.to(device) for k, v in expert_features.items()},
                prompt_input_ids=batch["input_ids"].to(device),  # read by a router that reads the prompt
                prompt_attention_mask=batch["attention_mask"].to(device),
                return_dict=True,
            )
            encoded = {"mm_encoder_outputs": {"image": features}}
        out = model.generate(
            **{k: v.to(device) for k, v in batch.items()}, **encoded, max_new_tokens=max_new_tokens, do_sample=False
        )
        new = out[:, batch["input_ids"].shape[1] :]
        texts.extend(ws.processor.batch_decode(new, skip_special_tokens=True))
        per_example = [None] * len(chunk)
        if features is not None and features.router_probs is not None:
            # the tokens' probabilities are per image, in the examples' order: each example's own images (several
            # for a multi-image or video row, none for a text-only one)
            per_image = features.router_probs.float().cpu()  # [images, tokens, experts]
            keys = [as_conversation(example)[0] for example in chunk]
            per_example = [
                router_shares(part.flatten(0, 1), image_keys, token_masks) if len(part) else None
                for part, image_keys in zip(per_image.split([len(k) for k in keys]), keys, strict=True)
            ]
        routers.extend(per_example)
    model.train(was_training)
    return texts, routers


def router_shares(probs: torch.Tensor, keys: list[str], token_masks: dict[str, torch.Tensor] | None) -> dict:
    """An example's router probabilities per token ([tokens, experts]) -> their means: over all its tokens, and for
    one image with a mask in `token_masks`, over the tokens under an object and over the others."""
    shares = {"all": probs.mean(dim=0)}
    mask = token_masks.get(keys[0]) if token_masks and len(keys) == 1 else None
    if mask is not None and len(mask) == len(probs):
        for part, chosen in (("objects", mask), ("background", ~mask)):
            if chosen.any():
                shares[part] = probs[chosen].mean(dim=0)
    return shares


def reference_answer(example: dict) -> str:
    """What an example's last turn should say: its answer, or its last assistant message."""
    if "answer" in example:
        return example["answer"]
    return [m["content"] for m in example["messages"] if m["role"] == "assistant"][-1]


def answer_accuracy(ws: Workspace, examples: list[dict]) -> float:
    texts, _ = answers(ws, examples)
    hits = sum(normalise(t) == normalise(reference_answer(e)) for t, e in zip(texts, examples, strict=True))
    return hits / len(examples)


@torch.no_grad()
def token_accuracy(ws: Workspace, examples: list[dict]) -> float:
    """Teacher-forced accuracy of the next target token on held-out examples (pre-alignment's held-out measure)."""
    model = ws.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = ws.collator(examples)
    batch = {
        k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v.to(device)) for k, v in batch.items()
    }
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    model.train(was_training)
    return float((logits.argmax(-1)[mask] == labels[mask]).float().mean())


class CachedInputs:
    """Benchmark inputs (astrea.evaluation.benchmark) whose `image` fields are feature-cache keys: the experts'
    features come from the cache instead of running the experts again."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    def generation(self, rows: list[dict], prompts: list[str]) -> dict:
        model = self.ws.model
        device = next(model.parameters()).device
        examples = [{"key": row["image"], "prompt": prompt} for row, prompt in zip(rows, prompts, strict=True)]
        batch = self.ws.collator.generation_inputs(examples)
        batch = {
            k: ({n: t.to(device) for n, t in v.items()} if k == "expert_features" else v.to(device))
            for k, v in batch.items()
        }
        features = model.get_image_features(
            expert_features=batch.pop("expert_features"),
            prompt_input_ids=batch["input_ids"],  # read by a router that reads the prompt
            prompt_attention_mask=batch["attention_mask"],
            return_dict=True,
        )
        return {**batch, "mm_encoder_outputs": {"image": features}}

    def images(self, rows: list[dict]) -> dict:
        return {"expert_features": self.ws.cache.load([row["image"] for row in rows])}


def evaluate_benchmark(ws: Workspace, rows: list[dict], batch_size: int | None = None) -> tuple[list[dict], dict]:
    """`astrea.evaluation.benchmark.evaluate` on rows whose images are feature-cache keys (see CachedInputs)."""
    from astrea.evaluation.benchmark import evaluate as evaluate_rows

    batch_size = batch_size or ws.recipe.eval.batch_size
    return evaluate_rows(ws.model, ws.processor, rows, batch_size, inputs=CachedInputs(ws), progress=False)


def object_token_masks(records: list[dict], grid: int) -> dict[str, torch.Tensor]:
    """Per image key, which of its `grid` x `grid` visual tokens (raster order) lie under one of its boxes: the
    normalised `[x0, y0, x1, y1]` boxes of an eval source in COCO instances form. The experts see the image
    stretched to a square, so a box's share of the image is its share of the grid."""
    masks = {}
    for record in records:
        if not record.get("boxes") or len(record.get("keys") or ()) != 1:
            continue
        mask = masks.setdefault(record["keys"][0], torch.zeros(grid, grid, dtype=torch.bool))
        for x0, y0, x1, y1 in record["boxes"]:  # every cell the box overlaps (an edge on a cell's border: not it)
            top, left = min(int(y0 * grid + 1e-6), grid - 1), min(int(x0 * grid + 1e-6), grid - 1)
            bottom, right = math.ceil(y1 * grid - 1e-6), math.ceil(x1 * grid - 1e-6)
            mask[top : max(top + 1, bottom), left : max(left + 1, right)] = True
    return {key: mask.flatten() for key, mask in masks.items()}


def evaluate(ws: Workspace) -> dict:
    """Held-out accuracy per question type next to chance (where it is known), and the router's mean expert share
    per type: over all visual tokens, and (where an eval source gives the images' boxes, as the synthetic set's
    COCO instances do) over the tokens under an object and the others. With data.sources: the `eval` phase's
    conversations, by source (the last assistant turn is the reference, scored by exact match after
    normalisation, as astrea.evaluation's VQA metrics do)."""
    from astrea.evaluation.metrics import exact_match

    if ws.records is None:
        examples = question_examples(ws.data["test"], ws.keys["test"])
    else:
        examples = conversation_examples([r for r in ws.records["eval"] if "messages" in r])
        if not examples:
            logger.warning("no data.sources row feeds eval: no accuracy table")
            return {"accuracy": {}, "subgroups": {}, "chance": {}, "count": {}, "router": {}, "examples": []}
    masks = None  # per-token routing only: a sample-level router gives every token of an image one mixture
    if ws.records and ws.model.config.router_mode == "token":
        masks = object_token_masks(ws.records["eval"], ws.model.config.image_grid_size)
    texts, routers = answers(ws, examples, token_masks=masks)
    correct, total = defaultdict(float), defaultdict(int)
    # the router's shares per type: over all tokens, the tokens under an object, the others
    shares = {part: defaultdict(lambda: torch.zeros(len(EXPERT_NAMES))) for part in ("all", "objects", "background")}
    counts = {part: defaultdict(int) for part in shares}
    sub_correct, sub_total = defaultdict(lambda: defaultdict(float)), defaultdict(lambda: defaultdict(int))
    for index, (text, example) in enumerate(zip(texts, examples, strict=True)):
        kind = example["type"]
        hit = exact_match(text, reference_answer(example))
        total[kind] += 1
        correct[kind] += hit
        if "subgroup" in example:
            sub_total[kind][example["subgroup"]] += 1
            sub_correct[kind][example["subgroup"]] += hit
        for part, mean in (routers[index] or {}).items():  # none for a text-only example: nothing routed
            shares[part][kind] += mean
            counts[part][kind] += 1
    chance = chance_levels()
    return {
        "accuracy": {kind: round(correct[kind] / total[kind], 4) for kind in total},
        # per type, by the rows' `subgroup` (the synthetic set's: how many objects the image has), with counts
        "subgroups": {
            kind: {
                group: {"accuracy": round(sub_correct[kind][group] / n, 4), "n": n}
                for group, n in sorted(groups.items())
            }
            for kind, groups in sub_total.items()
        },
        "chance": {
            kind: round(chance[question_type(kind)], 4) if question_type(kind) in chance else None for kind in total
        },
        "count": dict(total),
        **{
            name: {
                kind: dict(zip(EXPERT_NAMES, (shares[part][kind] / counts[part][kind]).tolist(), strict=True))
                for kind in shares[part]
            }
            for name, part in (("router", "all"), ("router_objects", "objects"), ("router_background", "background"))
            if shares[part] or part == "all"
        },
        "examples": [
            {
                "question": e.get("prompt") or e["messages"][-2]["content"],
                "answer": reference_answer(e),
                "prediction": t,
            }
            for e, t in list(zip(examples, texts, strict=True))[:20]
        ],
    }


# --- plots and the whole run -------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def plot_router(metrics: dict, path: Path) -> None:
    """Mean router probability per expert and question type (Fig. 2): over all visual tokens, and, where the
    evaluation knew the objects' boxes, over the tokens under an object and the others."""
    panels = [
        (key, title)
        for key, title in (
            ("router", "all visual tokens"),
            ("router_objects", "tokens under an object"),
            ("router_background", "the other tokens"),
        )
        if key == "router" or metrics.get(key)
    ]
    fig, axes = _pyplot().subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    width = 0.8 / len(EXPERT_NAMES)
    for ax, (key, title) in zip(axes[:, 0], panels, strict=True):
        kinds = [kind for kind in metrics.get(key, {}) if question_type(kind) == kind]  # not the unseen split's
        for i, expert in enumerate(EXPERT_NAMES):
            heights = [metrics[key][kind][expert] for kind in kinds]
            ax.bar([k + i * width for k in range(len(kinds))], heights, width=width, label=expert)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], kinds)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean router probability")
        ax.set_title(f"Expert contributions per question type, {title} (cf. paper Fig. 2)", fontsize=10)
    axes[0, 0].legend(fontsize=8)
    _save(fig, path)


def plot_stages(records: list[dict], path: Path) -> None:
    """Training loss and held-out accuracy per stage (Fig. 3), and MoCo's loss against its chance level where a stage
    had one."""
    moco = [record for record in records if record.get("moco")]
    fig, axes = _pyplot().subplots(3 if moco else 2, 1, figsize=(9, 8.5 if moco else 6), sharex=True)
    top, bottom = axes[0], axes[1]
    offset = 0
    for record in records:
        for axis, key, style in ((top, "loss", {}), (bottom, "heldout", {"marker": "o"})):
            if record[key]:
                steps, values = zip(*record[key], strict=True)
                axis.plot([offset + s for s in steps], values, label=record["stage"], **style)
        if record.get("moco"):
            steps, losses, chances = zip(*record["moco"], strict=True)
            axes[2].plot([offset + s for s in steps], losses, label=f"L_moco ({record['stage']})")
            axes[2].plot([offset + s for s in steps], chances, ls="--", color="gray", label="chance (uniform)")
        offset += record["steps"]
        for axis in axes:
            axis.axvline(offset, color="gray", lw=0.5)
    top.set_ylabel("training loss")
    bottom.set_ylabel("held-out accuracy\n(stages: target tokens;\ninstruct: answers)")
    if moco:
        axes[2].set_ylabel("MoCo loss (Eq. 7)")
        axes[2].legend(fontsize=8)
    axes[-1].set_xlabel("step (stages in order)")
    top.set_title("Pre-alignment stages and instruction tuning (cf. paper Fig. 3)")
    top.legend(fontsize=8)
    _save(fig, path)


def run(
    recipe: Recipe,
    phases: tuple[str, ...] = ("prealign", "instruct", "evaluate"),
    resume: bool = False,
    callbacks=None,
) -> dict:
    """The recipe's phases in order; returns (and writes) the metrics."""
    start = time.perf_counter()
    ws = prepare(recipe, resume=resume, callbacks=callbacks)
    records = []
    if "prealign" in phases:
        records += prealign(ws)
    if "instruct" in phases:
        records += instruct(ws)
    metrics = {"recipe": recipe.output_dir}
    main_process = process_rank()[0] == 0  # every process trains and evaluates; one writes
    save_model_folder(ws.model, ws.output_dir / "model", ws.processor)  # before evaluation, which may fail
    if "evaluate" in phases:
        metrics.update(evaluate(ws))
        if main_process:
            plot_router(metrics, ws.output_dir / "router.png")
    if records and main_process:
        plot_stages(records, ws.output_dir / "stages.png")
    metrics["stages"] = [{k: r.get(k) for k in ("stage", "steps", "seconds", "heldout", "moco")} for r in records]
    metrics["feature_cache"] = ws.cache.stats()
    metrics["minutes"] = round((time.perf_counter() - start) / 60, 2)
    if main_process:
        (ws.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def accuracy_table(metrics: dict) -> str:
    lines = ["| question type | accuracy | chance | n |", "| --- | --- | --- | --- |"]
    for kind, value in metrics.get("accuracy", {}).items():
        chance = metrics["chance"].get(kind)
        chance = "–" if chance is None else f"{chance:.1%}"
        lines.append(f"| {kind} | {value:.1%} | {chance} | {metrics['count'][kind]} |")
    by_subgroup = [
        f"{kind} by subgroup: " + ", ".join(f"{name} {g['accuracy']:.1%} ({g['n']})" for name, g in groups.items())
        for kind, groups in metrics.get("subgroups", {}).items()
        if len(groups) > 1 and question_type(kind) == kind  # the held-out split's; the unseen renderer's in the json
    ]
    if by_subgroup:
        lines.append("\n" + "\n".join(by_subgroup))
    for stage in metrics.get("stages", []):
        if stage.get("moco"):  # MoCo's loss over the stage's first and last tenth of logging steps, and chance
            curve = stage["moco"]
            tenth = max(1, len(curve) // 10)
            first, last = (sum(row[1] for row in part) / len(part) for part in (curve[:tenth], curve[-tenth:]))
            chance = sum(row[2] for row in curve[-tenth:]) / tenth
            name = stage["stage"]
            lines.append(f"\n{name}: L_moco {first:.2f} at the start, {last:.2f} at the end (chance {chance:.2f})")
    return "\n".join(lines)


__all__ = ["Workspace", "accuracy_table", "build_model", "evaluate", "prepare", "run"]
