"""Check a served Astrea against `generate()`: the same greedy tokens, the same accuracy. Runs in the serving
environment (`make install-serve`: vLLM and the transformers release it pins), where this package is not installed:
the model folder's own remote code is what runs, on both sides.

    python serving/vllm_check.py offline --model DIR --requests vqa.jsonl --output out.json [--tensor-parallel-size 2]
    python serving/vllm_check.py server  --url http://127.0.0.1:8000 --requests vqa.jsonl --output out.json
    python serving/vllm_check.py bench   --url http://127.0.0.1:8000 --model DIR --requests vqa.jsonl --output out.json

`--requests` is a JSONL file in `astrea-eval`'s benchmark format (`astrea-eval synthetic` writes one): per line an
`image` path (relative to the file; or a list of paths) and a `question`, with optional `answers` to score.

- `offline`: transformers' `generate()` (greedy, one request at a time) and then vLLM's offline `LLM.generate` on
  the same prompts; writes both token lists and exits with 1 when any differs.
- `server`: the same requests through a running OpenAI-compatible server (chat completions, images as base64
  data URLs), with `generate()`'s tokens beside them; exits with 1 when any differs.
- `bench`: N concurrent streamed requests through the server against the same requests through `generate()` in
  batches of N: requests per second and time to first token, and their ratio.
"""

import argparse
import base64
import json
import mimetypes
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib import error, request

from serve import bind_cpu_threads, check_plugin, quiet_environment  # serving/serve.py, beside this file

MAX_NEW_TOKENS = 8


def read_requests(path: str, limit: int | None) -> list[dict]:
    rows = []
    folder = Path(path).parent
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        images = row.get("image")
        images = [images] if isinstance(images, str) else list(images or [])
        if "question" not in row:
            raise SystemExit(f"{path}, line {number}: no `question`.")
        row["images"] = [str(folder / image) for image in images]
        missing = [image for image in row["images"] if not Path(image).is_file()]
        if missing:
            raise SystemExit(f"{path}, line {number}: image file {missing[0]} does not exist.")
        rows.append(row)
    return rows[:limit] if limit else rows


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


def accuracy(rows: list[dict], texts: list[str]) -> float | None:
    """Exact-match accuracy against the rows' `answers` (None when the rows have none)."""
    scored = [(row, text) for row, text in zip(rows, texts, strict=True) if row.get("answers")]
    if not scored:
        return None
    right = sum(normalise(text) in {normalise(a) for a in row["answers"]} for row, text in scored)
    return right / len(scored)


def messages(row: dict, image_parts: list[dict] | None = None) -> list[dict]:
    parts = image_parts if image_parts is not None else [{"type": "image"} for _ in row["images"]]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": row["question"]}]}]


def data_url(path: str) -> str:
    media_type = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{media_type};base64," + base64.b64encode(Path(path).read_bytes()).decode()


# --- transformers' generate() ------------------------------------------------------------------------------


class Reference:
    """The model folder through transformers (remote code): greedy `generate()`."""

    def __init__(self, model: str):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
        self.model = AutoModelForImageTextToText.from_pretrained(model, trust_remote_code=True, dtype=torch.float32)
        self.model.eval()

    def prompt(self, row: dict) -> str:
        return self.processor.apply_chat_template(messages(row), add_generation_prompt=True)

    def generate(self, rows: list[dict], max_new_tokens: int) -> list[list[int]]:
        """Greedy tokens for a batch of rows (padded on the left), EOS and padding dropped."""
        from PIL import Image

        texts = [self.prompt(row) for row in rows]
        images = [Image.open(path).convert("RGB") for row in rows for path in row["images"]]
        inputs = self.processor(
            images=images or None, text=texts, padding=True, padding_side="left", return_tensors="pt"
        )
        extra = {}
        if getattr(self.model.config, "router_prompt", False) and images:
            # vLLM encodes each image without its prompt, so a task-aware router routes on the image alone there:
            # the reference does the same (docs/serving.md)
            pixels = {k: inputs.pop(k) for k in list(inputs) if "pixel" in k or k.startswith("detection_")}
            with self.torch.no_grad():
                features = self.model.model.get_image_features(**pixels, return_dict=True)
            extra["mm_encoder_outputs"] = {"image": features}
        with self.torch.no_grad():
            output = self.model.generate(**inputs, **extra, max_new_tokens=max_new_tokens, do_sample=False)
        new = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [_until(ids, {self.processor.tokenizer.eos_token_id}) for ids in new]

    def decode(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _until(ids: list[int], stop: set[int]) -> list[int]:
    out = []
    for token in ids:
        if token in stop:
            break
        out.append(token)
    return out


# --- the three commands ------------------------------------------------------------------------------------


def offline(args) -> int:
    quiet_environment()
    check_plugin(args.tensor_parallel_size)
    bind_cpu_threads(args.tensor_parallel_size)
    from PIL import Image
    from vllm import LLM, SamplingParams

    rows = read_requests(args.requests, args.limit)
    reference = Reference(args.model)
    expected = [reference.generate([row], args.max_new_tokens)[0] for row in rows]
    prompts = [
        {
            "prompt": reference.prompt(row),
            "multi_modal_data": {"image": [Image.open(p).convert("RGB") for p in row["images"]]},
        }
        for row in rows
    ]
    llm = LLM(
        model=args.model,
        trust_remote_code=True,
        model_impl="transformers",
        dtype="float32",
        max_model_len=args.max_model_len,
        limit_mm_per_prompt={"image": max(len(row["images"]) for row in rows)},
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.memory_fraction,
        enforce_eager=True,
    )
    architecture = llm.llm_engine.model_config.architecture  # what vLLM resolved the folder to
    outputs = llm.generate(prompts, SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0))
    served = [list(output.outputs[0].token_ids) for output in outputs]
    stop = {reference.processor.tokenizer.eos_token_id}
    served = [_until(ids, stop) for ids in served]
    return report(args, rows, expected, served, reference, {"vllm_architecture": architecture})


def post(url: str, body: dict, timeout: float = 300) -> dict:
    data = json.dumps(body).encode()
    req = request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with request.urlopen(req, timeout=timeout) as response:
            return json.loads(response.read())
    except error.HTTPError as failure:
        return {"status": failure.code, "error": json.loads(failure.read() or b"{}")}


def chat_body(model: str, row: dict, max_new_tokens: int, **extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in row["images"]]
    return {
        "model": model,
        "messages": messages(row, parts),
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
        **extra,
    }


def served_model(url: str) -> str:
    with request.urlopen(url.rstrip("/") + "/v1/models", timeout=30) as response:
        return json.loads(response.read())["data"][0]["id"]


def server(args) -> int:
    rows = read_requests(args.requests, args.limit)
    name = served_model(args.url)
    endpoint = args.url.rstrip("/") + "/v1/chat/completions"

    def ask(row):
        answer = post(endpoint, chat_body(name, row, args.max_new_tokens, return_token_ids=True))
        if "choices" not in answer:
            raise SystemExit(f"the server refused {row.get('id', row['question'])!r}: {answer}")
        return list(answer["choices"][0]["token_ids"])

    with ThreadPoolExecutor(args.concurrency) as pool:
        served = list(pool.map(ask, rows))
    reference = Reference(args.model)
    expected = [reference.generate([row], args.max_new_tokens)[0] for row in rows]
    stop = {reference.processor.tokenizer.eos_token_id}
    return report(args, rows, expected, [_until(ids, stop) for ids in served], reference, {"url": args.url})


def report(args, rows, expected, served, reference, extra: dict) -> int:
    texts = {"generate": [reference.decode(i) for i in expected], "vllm": [reference.decode(i) for i in served]}
    different = [index for index, (a, b) in enumerate(zip(expected, served, strict=True)) if a != b]
    result = {
        **extra,
        "requests": len(rows),
        "identical": len(rows) - len(different),
        "different": different,
        "accuracy": {side: accuracy(rows, side_texts) for side, side_texts in texts.items()},
        "generate": expected,
        "vllm": served,
        "texts": texts,
    }
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(
        f"{result['identical']}/{len(rows)} requests gave identical greedy tokens; accuracy generate() "
        f"{result['accuracy']['generate']} vs vLLM {result['accuracy']['vllm']}"
    )
    return 1 if different else 0


def bench(args) -> int:
    """Requests per second and time to first token: the server under `concurrency` concurrent streamed requests,
    against `generate()` on the same requests in batches of `concurrency`."""
    rows = read_requests(args.requests, args.limit)
    name = served_model(args.url)
    endpoint = args.url.rstrip("/") + "/v1/chat/completions"

    def stream(row) -> tuple[float, float]:
        body = chat_body(name, row, args.max_new_tokens, stream=True)
        req = request.Request(endpoint, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        first = None
        with request.urlopen(req, timeout=600) as response:
            for line in response:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                delta = json.loads(line[5:])["choices"][0].get("delta", {})
                if first is None and delta.get("content"):
                    first = time.perf_counter() - start
        return first if first is not None else time.perf_counter() - start, time.perf_counter() - start

    stream(rows[0])  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        timings = list(pool.map(stream, rows))
    server_seconds = time.perf_counter() - start

    reference = Reference(args.model)
    reference.generate(rows[:1], args.max_new_tokens)  # warm-up
    start, first_tokens = time.perf_counter(), []
    for index in range(0, len(rows), args.concurrency):
        batch = rows[index : index + args.concurrency]
        batch_start = time.perf_counter()
        reference.generate(batch, 1)  # the batch's first token: prefill, as a client of generate() would wait
        first_tokens += [time.perf_counter() - batch_start] * len(batch)
        reference.generate(batch, args.max_new_tokens)
    # the first-token pass is a measurement aid, not part of the batched answers: leave its time out
    generate_seconds = time.perf_counter() - start - sum(first_tokens[:: args.concurrency])

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    server_ttft = median([first for first, _ in timings])
    result = {
        "requests": len(rows),
        "concurrency": args.concurrency,
        "max_new_tokens": args.max_new_tokens,
        "server": {"requests_per_second": len(rows) / server_seconds, "ttft_median_s": server_ttft},
        "generate": {"requests_per_second": len(rows) / generate_seconds, "ttft_median_s": median(first_tokens)},
    }
    result["ratio"] = {
        "requests_per_second": result["server"]["requests_per_second"] / result["generate"]["requests_per_second"],
        "ttft": result["server"]["ttft_median_s"] / result["generate"]["ttft_median_s"],
    }
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("offline", "server", "bench"):
        sub = commands.add_parser(name)
        sub.add_argument("--requests", required=True, help="JSONL file: image (path or list), question, answers")
        sub.add_argument("--output", required=True, help="where the JSON result goes")
        sub.add_argument("--limit", type=int, default=None, help="only the first N requests")
        sub.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
        sub.add_argument("--model", required=True, help="the model folder (the server's, for server and bench)")
        if name == "offline":
            sub.add_argument("--tensor-parallel-size", type=int, default=1)
            sub.add_argument("--max-model-len", type=int, default=None, help="default: the LLM's own")
            sub.add_argument("--memory-fraction", type=float, default=0.3, help="vLLM's gpu_memory_utilization")
        else:
            sub.add_argument("--url", default="http://127.0.0.1:8000")
            sub.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    return {"offline": offline, "server": server, "bench": bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
