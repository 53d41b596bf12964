"""Astrea's performance, measured as ratios of things run side by side in one process (`make bench`).

    python benchmarks/run.py [--only P1,P2] [--repeats 5] [--configs tiny,mid]

Writes `benchmarks/results.json` (a list of {id, name, value, limit, config, device, details}) and
`benchmarks/results.md`. Every figure is a ratio (or a rate next to its reference) of medians over `--repeats`
interleaved repetitions, so that it holds on a noisy machine. The device is CUDA when there is one (bf16 there),
else the CPU (float32). Peak memory on the CPU is the peak RSS of the measured call over the RSS before it, in a
fresh subprocess per case (Linux `/proc`); on CUDA, `torch.cuda.max_memory_allocated` over the memory before.

P1-P8 are the issue's figures; R1 adds the optional sample-level router's prefill against the per-token one, and
R2 the fusion block under `torch.compile` (`model.model.compile_fusion()`) against eager.

Configurations: `tiny` is `examples/configs/tiny`; `mid` scales it to the paper's visual token count (24x24 = 576),
a SigLIP tower at 384 px and a 1024-wide, 8-layer LLM (the LLM then dominates, as at real scale).
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from astrea.processing import AstreaImageProcessor
from modeling_astrea import EXPERT_NAMES, PIXEL_INPUT_NAMES, AstreaConfig, AstreaForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "configs" / "tiny"

LLM_MID = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 4096,
}
OVERRIDES = {
    "tiny": {},
    "mid": {
        "image_grid_size": 24,
        "adapter_hidden_size": 256,
        "caption_config": {
            "image_size": 384,
            "patch_size": 16,
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 4,
            "num_attention_heads": 6,
        },
        "text_config": LLM_MID,
    },
}


# --- set-up ------------------------------------------------------------------------------------------------


def device_and_dtype():
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def build(name: str, text_overrides: dict | None = None, seed: int = 0, **config_overrides):
    """(model, processor) of a named configuration, random weights, on the benchmark device, in eval mode."""
    from astrea.training.recipe import deep_merge

    config = AstreaConfig.from_pretrained(TINY)
    overrides = deep_merge(OVERRIDES[name], {"text_config": text_overrides or {}, **config_overrides})
    config = AstreaConfig.from_dict(deep_merge(config.to_dict(), overrides))
    torch.manual_seed(seed)
    device, dtype = device_and_dtype()
    model = AstreaForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(TINY)
    processor.image_processor = AstreaImageProcessor.from_model_config(
        config, detection_size=processor.image_processor.expert_sizes["detection"]
    )
    processor.num_image_tokens = config.num_image_tokens
    return model, processor


def inputs_for(model, processor, batch: int = 1, question: str = "What colour is the circle?", turns: int = 1):
    """Processor inputs for `batch` copies of one drawn image with a (multi-turn) chat prompt, on the device."""
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    messages = []
    for turn in range(turns):
        content = [{"type": "text", "text": question}]
        if turn == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": "It is red."}]})
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return on_device(processor(images=[image] * batch, text=[text] * batch, return_tensors="pt"))


def on_device(batch: dict) -> dict:
    """A batch on the benchmark device, floating tensors in its dtype (nested dicts too); `num_tiles` dropped."""
    device, dtype = device_and_dtype()
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = on_device(value)
        elif key != "num_tiles":
            out[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return out


def bare_llm(model):
    """The Astrea model's LLM as a plain causal LM with the same weights."""
    llm = AutoModelForCausalLM.from_config(model.config.text_config)
    llm.model.load_state_dict(model.model.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    param = next(model.parameters())
    return llm.to(device=param.device, dtype=param.dtype).eval()


def text_only(inputs, model):
    """The same token sequence with the image placeholders swapped for ordinary tokens (for the bare LLM)."""
    ids = inputs["input_ids"].clone()
    ids[ids == model.config.image_token_id] = model.config.text_config.bos_token_id
    return {"input_ids": ids, "attention_mask": inputs["attention_mask"]}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def medians(cases: dict, repeats: int, budget_s: float = 3.0) -> dict[str, float]:
    """Median seconds of each case, the cases interleaved in every repetition (after one warm-up each). Fast cases
    get more repetitions than `repeats`, as many as fit in about `budget_s` seconds (at most 200)."""
    round_s = sum(timed(fn) for fn in cases.values())
    repeats = max(repeats, min(200, int(budget_s / max(round_s, 1e-6))))
    runs = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            runs[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in runs.items()}


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def result(pid, name, value, config, limit=None, **details):
    details = _rounded(details)
    return {
        "id": pid,
        "name": name,
        "value": round(value, 4),
        "limit": limit,
        "config": config,
        "device": device_name(),
        "details": details,
    }


# --- the benchmarks ----------------------------------------------------------------------------------------


@torch.no_grad()
def p1_decode_step(config: str, repeats: int, new_tokens: int = 32) -> dict:
    """Seconds per generated token, Astrea over its bare LLM, from the same prefilled cache length."""
    model, processor = build(config)
    llm = bare_llm(model)
    inputs = inputs_for(model, processor)

    def decode(net, prefill):
        def run():
            out = net(**prefill, use_cache=True)
            cache, token, mask = out.past_key_values, out.logits[:, -1:].argmax(-1), prefill["attention_mask"]
            sync()
            start = time.perf_counter()
            for _ in range(new_tokens):
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = net(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            run.seconds.append((time.perf_counter() - start) / new_tokens)

        run.seconds = []
        return run

    astrea, bare = decode(model, inputs), decode(llm, text_only(inputs, model))
    for _ in range(repeats + 1):
        astrea()
        bare()
    a, b = statistics.median(astrea.seconds[1:]), statistics.median(bare.seconds[1:])
    return result(
        "P1",
        "decode step: Astrea / bare LLM, seconds per token",
        a / b,
        config,
        limit=1.0,
        astrea_ms=a * 1e3,
        llm_ms=b * 1e3,
        cache_length=inputs["input_ids"].shape[1],
        new_tokens=new_tokens,
        repeats=repeats,
    )


@torch.no_grad()
def p2_prefill_overhead(config: str, repeats: int) -> dict:
    """Astrea's forward for one image over the sum of its parts run alone (4 experts + LLM on the same tokens)."""
    model, processor = build(config)
    llm = bare_llm(model)
    inputs = inputs_for(model, processor)
    text = text_only(inputs, model)
    experts = model.model.experts
    detection = {
        k: inputs[f"detection_{k}"]
        for k in ("pixel_mask", "input_ids", "attention_mask")
        if f"detection_{k}" in inputs
    }

    def kwargs_of(name):
        return detection if name == "detection" else {}

    def run_experts():  # the four experts back to back, as any implementation has to run them
        for name in EXPERT_NAMES:
            experts[name](inputs[PIXEL_INPUT_NAMES[name]], **kwargs_of(name))

    cases = {
        "astrea": lambda: model(**inputs, use_cache=False),
        "experts": run_experts,
        "llm": lambda: llm(**text, use_cache=False),
    }
    times = medians(cases, repeats)
    alone = {
        name: medians({name: lambda n=name: experts[n](inputs[PIXEL_INPUT_NAMES[n]], **kwargs_of(n))}, 1)[name]
        for name in EXPERT_NAMES
    }
    return result(
        "P2",
        "prefill: Astrea forward / sum of its parts alone",
        times["astrea"] / (times["experts"] + times["llm"]),
        config,
        limit=1.0,
        ms={name: round(seconds * 1e3, 2) for name, seconds in times.items()},
        each_expert_ms={name: round(seconds * 1e3, 2) for name, seconds in alone.items()},
        sequence_length=inputs["input_ids"].shape[1],
        repeats=repeats,
    )


LLM_SIZES = {"llm-small": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4}, "llm-mid": {}}


def llava_next_like(model):
    """LLaVA-NeXT with Astrea's LLM and SigLIP tower (same configs, its own random weights) and its processor."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    vision = model.config.caption_config
    side = vision.image_size
    config = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=model.config.text_config.to_dict(),
        image_token_id=model.config.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
    )
    config.vision_config.model_type = "siglip_vision_model"
    param = next(model.parameters())
    llava = LlavaNextForConditionalGeneration(config).to(device=param.device, dtype=param.dtype).eval()
    tokenizer = AutoProcessor.from_pretrained(TINY).tokenizer
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="full",
        image_token=tokenizer.convert_ids_to_tokens(model.config.image_token_id),
    )
    return llava, processor


@torch.no_grad()
def p3_against_llava_next(llm_size: str, repeats: int) -> dict:
    """Time to first token, Astrea (576 tokens) over LLaVA-NeXT (anyres, 4 tiles + base), one 768x768 image."""
    model, processor = build("mid", LLM_SIZES[llm_size])
    llava, llava_processor = llava_next_like(model)
    image = Image.new("RGB", (2 * model.config.caption_config.image_size,) * 2, (180, 120, 60))
    prompt = "<image> What colour is the circle?"
    ours = on_device(processor(images=[image], text=[prompt], return_tensors="pt"))
    theirs = on_device(llava_processor(images=[image], text=[prompt], return_tensors="pt"))
    generate = {"max_new_tokens": 1, "min_new_tokens": 1, "do_sample": False}
    times = medians(
        {
            "astrea": lambda: model.generate(**ours, **generate),
            "llava_next": lambda: llava.generate(**theirs, **generate),
        },
        repeats,
    )
    tokens = {"astrea": int(ours["input_ids"].shape[1]), "llava_next": int(theirs["input_ids"].shape[1])}
    memory = {name: peak_memory_mb("ttft", llm_size=llm_size, which=name) for name in ("astrea", "llava_next")}
    return result(
        "P3",
        f"time to first token: Astrea / LLaVA-NeXT ({llm_size})",
        times["astrea"] / times["llava_next"],
        f"mid/{llm_size}",
        ttft_ms={k: round(v * 1e3, 1) for k, v in times.items()},
        sequence_length=tokens,
        peak_memory_mb=memory,
        memory_ratio=round(memory["astrea"] / memory["llava_next"], 3),
        llm_parameters_m=round(sum(p.numel() for p in model.model.language_model.parameters()) / 1e6, 1),
        repeats=repeats,
    )


@torch.no_grad()
def p4_multi_turn(config: str, repeats: int) -> dict:
    """Second chat turn on one image: time to first token with the fused image tokens reused vs recomputed."""
    model, processor = build(config)
    inputs = inputs_for(model, processor, turns=2)
    pixels = {k: v for k, v in inputs.items() if k.endswith("pixel_values") or k.startswith("detection_")}
    text = {k: v for k, v in inputs.items() if k not in pixels}
    features = model.get_image_features(**pixels, return_dict=True)  # from the first turn
    generate = {"max_new_tokens": 1, "min_new_tokens": 1, "do_sample": False}
    times = medians(
        {
            "reused": lambda: model.generate(**text, mm_encoder_outputs={"image": features}, **generate),
            "recomputed": lambda: model.generate(**inputs, **generate),
        },
        repeats,
    )
    return result(
        "P4",
        "second-turn time to first token: reused / recomputed image features",
        times["reused"] / times["recomputed"],
        config,
        ttft_ms={k: round(v * 1e3, 2) for k, v in times.items()},
        sequence_length=inputs["input_ids"].shape[1],
        repeats=repeats,
    )


def p5_prealign_throughput(repeats: int, batch_size: int = 16, steps: int = 4) -> dict:
    """Pre-alignment (stage 1) training samples/s with the feature cache warm, cold (filled as it goes), or off."""
    import random
    import tempfile

    from astrea.training.collator import AstreaCollator
    from astrea.training.data import draw_example
    from astrea.training.feature_cache import FeatureCache, image_key
    from modeling_astrea.modeling_astrea import AstreaAlignment

    model, processor = build("tiny")
    model.model.alignment = AstreaAlignment(("caption",))
    model.requires_grad_(False)
    trainable = [*model.model.projectors["caption"].parameters(), *model.model.language_model.parameters()]
    for parameter in trainable:
        parameter.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    rng = random.Random(0)
    fresh = iter(lambda: draw_example(rng), None)

    def batch_of(n):
        rows = [next(fresh) for _ in range(n)]
        return [
            (row["image"], {"key": image_key(row["image"]), "prompt": "caption", "answer": row["caption"]})
            for row in rows
        ]

    def train_step(batch):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache.for_model(root, model, processor.image_processor, experts=("caption",))
        collator = AstreaCollator(processor, cache, experts=("caption",))
        warm_batches = [batch_of(batch_size) for _ in range(steps)]
        cache.fill(model, processor.image_processor, [image for batch in warm_batches for image, _ in batch])

        def warm():
            for batch in warm_batches:
                train_step(on_device(collator([example for _, example in batch])))

        def cold():  # new images every call: the experts run, the entries are written, then read back
            for _ in range(steps):
                batch = batch_of(batch_size)
                cache.fill(model, processor.image_processor, [image for image, _ in batch])
                train_step(on_device(collator([example for _, example in batch])))

        def uncached():
            for batch in warm_batches:
                text = collator([example for _, example in batch])
                text.pop("expert_features")
                pixels = processor.image_processor([image for image, _ in batch], return_tensors="pt")
                text["pixel_values"] = pixels["pixel_values"]
                train_step(on_device(text))

        times = medians({"warm": warm, "cold": cold, "no_cache": uncached}, repeats)
    rates = {name: batch_size * steps / seconds for name, seconds in times.items()}
    return result(
        "P5",
        "pre-alignment samples/s: warm cache / no cache",
        rates["warm"] / rates["no_cache"],
        "tiny",
        samples_per_second={k: round(v, 1) for k, v in rates.items()},
        batch_size=batch_size,
        steps=steps,
        repeats=repeats,
    )


@torch.no_grad()
def p6_batched_generation(config: str, repeats: int, new_tokens: int = 16) -> dict:
    """Generated tokens/s at batch 1, 4 and 16; the value is batch 16's rate over batch 1's."""
    model, processor = build(config)
    generate = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    cases = {}
    for batch in (1, 4, 16):
        inputs = inputs_for(model, processor, batch=batch)
        cases[batch] = lambda inputs=inputs: model.generate(**inputs, **generate)
    times = medians(cases, repeats)
    rates = {batch: batch * new_tokens / seconds for batch, seconds in times.items()}
    return result(
        "P6",
        "generation tokens/s: batch 16 / batch 1",
        rates[16] / rates[1],
        config,
        tokens_per_second={str(k): round(v, 1) for k, v in rates.items()},
        new_tokens=new_tokens,
        repeats=repeats,
    )


@torch.no_grad()
def p7_efficiency(config: str, repeats: int) -> dict:
    """Achieved FLOP/s of Astrea's prefill over the FLOP/s of a large matmul, same device and dtype."""
    from torch.utils.flop_counter import FlopCounterMode

    model, processor = build(config)
    inputs = inputs_for(model, processor, batch=4)
    with FlopCounterMode(display=False) as counter:
        model(**inputs, use_cache=False)
    flops = counter.get_total_flops()
    device, dtype = device_and_dtype()
    side = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(side, side, device=device, dtype=dtype), torch.randn(side, side, device=device, dtype=dtype)
    times = medians({"astrea": lambda: model(**inputs, use_cache=False), "matmul": lambda: a @ b}, repeats)
    achieved, peak = flops / times["astrea"], 2 * side**3 / times["matmul"]
    return result(
        "P7",
        "prefill FLOP/s / large-matmul FLOP/s",
        achieved / peak,
        config,
        limit=1.0,
        prefill_gflops=round(flops / 1e9, 2),
        achieved_gflops_per_s=round(achieved / 1e9, 1),
        matmul_gflops_per_s=round(peak / 1e9, 1),
        matmul_side=side,
        batch=4,
        repeats=repeats,
    )


@torch.no_grad()
def r1_sample_routing(config: str, repeats: int) -> dict:
    """Prefill (time to first token) with sample-level routing over the paper's per-token routing, same weights
    otherwise; the sample router is steered to leave out the costliest expert (measured alone here), as it does
    for an image whose top-3 excludes it."""
    token_model, processor = build(config)
    model, _ = build(config, router_mode="sample")
    model.load_state_dict(
        {k: v for k, v in token_model.state_dict().items() if not k.startswith("model.router")}, strict=False
    )
    inputs = inputs_for(token_model, processor)
    experts = {
        name: medians(
            {name: lambda e=token_model.model.experts[name], p=inputs[PIXEL_INPUT_NAMES[name]]: e(p)}, repeats
        )[name]
        for name in ("classification", "detection", "segmentation")
    }
    costliest = max(experts, key=experts.get)
    bias = torch.full((len(EXPERT_NAMES),), 1.0)
    bias[EXPERT_NAMES.index(costliest)] = -10.0
    model.model.router.weight.zero_()
    model.model.router.bias.copy_(bias)
    generate = {"max_new_tokens": 1, "min_new_tokens": 1, "do_sample": False}
    times = medians(
        {
            "token": lambda: token_model.generate(**inputs, **generate),
            "sample": lambda: model.generate(**inputs, **generate),
        },
        repeats,
    )
    return result(
        "R1",
        f"time to first token: sample-level routing (skips {costliest}) / per-token routing",
        times["sample"] / times["token"],
        config,
        ttft_ms={k: round(v * 1e3, 2) for k, v in times.items()},
        expert_ms={k: round(v * 1e3, 2) for k, v in experts.items()},
        repeats=repeats,
    )


@torch.no_grad()
def r2_compiled_fusion(config: str, repeats: int) -> dict:
    """The fusion block (`fuse_expert_features`) under `torch.compile` over eager, on one image's expert features;
    the whole prefill's ratio is in the details."""
    model, processor = build(config)
    inputs = inputs_for(model, processor)
    features = model.model.get_expert_features(
        **{k: v for k, v in inputs.items() if k.endswith("pixel_values") or k.startswith("detection_")}
    )
    eager = model.model.fuse_expert_features
    start = time.perf_counter()
    model.model.compile_fusion()
    model.model.fuse_expert_features(features)  # compiles
    compile_s = time.perf_counter() - start
    compiled = model.model.fuse_expert_features
    fusion = medians({"eager": lambda: eager(features), "compiled": lambda: compiled(features)}, repeats)

    def prefill_with(fuse):
        def run():
            model.model.fuse_expert_features = fuse
            model(**inputs, use_cache=False)

        return run

    prefill = medians({"eager": prefill_with(eager), "compiled": prefill_with(compiled)}, repeats)
    return result(
        "R2",
        "fusion block: torch.compile / eager",
        fusion["compiled"] / fusion["eager"],
        config,
        fusion_ms={k: round(v * 1e3, 3) for k, v in fusion.items()},
        prefill_ratio=round(prefill["compiled"] / prefill["eager"], 3),
        compile_s=round(compile_s, 1),
        repeats=repeats,
    )


def p8_training_memory(config: str) -> dict:
    """Peak memory of one training step (instruction tuning: router, adapters, MoCo head, LLM), with gradient
    checkpointing over without."""
    memory = {
        mode: peak_memory_mb("train", config=config, checkpointing=mode == "checkpointing")
        for mode in ("plain", "checkpointing")
    }
    return result(
        "P8",
        "training step peak memory: gradient checkpointing / plain",
        memory["checkpointing"] / memory["plain"],
        config,
        peak_memory_mb=memory,
        batch=8,
    )


# --- peak memory, each case in a fresh process -------------------------------------------------------------


def peak_memory_mb(case: str, **kwargs) -> float:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        run_case(case, **kwargs)  # mark() sets the baseline after the model and inputs are built
        return (torch.cuda.max_memory_allocated() - _BASELINE["bytes"]) / 2**20
    command = [sys.executable, __file__, "--memory-case", json.dumps({"case": case, **kwargs})]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mb"]


def run_case(case: str, **kwargs):
    """Builds the case's model and inputs, then runs it once: returns after the measured call."""
    if case == "ttft":
        model, processor = build("mid", LLM_SIZES[kwargs["llm_size"]])
        if kwargs["which"] == "llava_next":
            model, processor = llava_next_like(model)
        image = Image.new("RGB", (2 * 384,) * 2, (180, 120, 60))
        batch = processor(images=[image], text=["<image> What colour is the circle?"], return_tensors="pt")
        batch = on_device(batch)
        mark()
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=1, do_sample=False)
    elif case == "train":
        model, processor = build(kwargs["config"])
        model.train()
        if kwargs["checkpointing"]:
            model.gradient_checkpointing_enable()
        inputs = inputs_for(model, processor, batch=8)
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        mark()
        model(**inputs).loss.backward()
        optimizer.step()
    else:
        raise ValueError(f"unknown memory case {case!r}")


_BASELINE = {}


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def mark():
    """Resets the process's peak RSS (Linux: clear_refs 5) and records the RSS now, what the model and inputs
    take, so that the peak read after the measured call is that call's own (on CUDA: allocated memory)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _BASELINE["bytes"] = torch.cuda.memory_allocated()
        return
    Path("/proc/self/clear_refs").write_text("5")
    _BASELINE["kb"] = _proc_status_kb("VmRSS")


def peak_since_mark_mb() -> float:
    return (_proc_status_kb("VmHWM") - _BASELINE["kb"]) / 1024


# --- the whole run -----------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    lines = ["| id | benchmark | config | value | limit | details |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        limit = "" if r["limit"] is None else r["limit"]
        details = ", ".join(f"{k}={v}" for k, v in r["details"].items())
        lines.append(f"| {r['id']} | {r['name']} | {r['config']} | {r['value']:.3f} | {limit} | {details} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="P1,P2,P3,P4,P5,P6,P7,P8,R1,R2", help="comma-separated benchmark ids")
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results.json")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_case:  # a subprocess of peak_memory_mb (CPU)
        spec = json.loads(args.memory_case)
        run_case(spec.pop("case"), **spec)
        print(json.dumps({"peak_mb": peak_since_mark_mb()}))
        return

    only, configs = set(args.only.split(",")), args.configs.split(",")
    unknown = only - {f"P{i}" for i in range(1, 9)} - {"R1", "R2"}
    if unknown:
        parser.error(f"unknown benchmark ids {sorted(unknown)}; choose from P1..P8, R1 and R2")
    plan = []
    for config in configs:
        plan += [("P1", p1_decode_step, config), ("P2", p2_prefill_overhead, config)]
        plan += [("P4", p4_multi_turn, config), ("P6", p6_batched_generation, config), ("P7", p7_efficiency, config)]
    plan += [("P3", p3_against_llava_next, size) for size in LLM_SIZES]
    plan += [("P5", lambda _, repeats: p5_prealign_throughput(repeats), None)]
    plan += [("P8", lambda config, _: p8_training_memory(config), config) for config in configs]
    plan += [("R1", r1_sample_routing, config) for config in configs]
    plan += [("R2", r2_compiled_fusion, config) for config in configs]
    results = []
    for pid, fn, config in sorted(plan, key=lambda item: (item[0][0] == "R", int(item[0][1:]))):
        if pid not in only:
            continue
        start = time.perf_counter()
        results.append(fn(config, args.repeats))
        print(f"{pid} {config or ''}: {results[-1]['value']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    args.output.write_text(json.dumps(results, indent=1))
    args.output.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
