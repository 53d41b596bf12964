"""Serve an Astrea model folder with vLLM's OpenAI-compatible server, through vLLM's Transformers modeling backend
(no engine code of ours: the folder's own remote code runs, with vLLM's attention and paged KV cache).

    make serve                                   # the `make demo` model, on http://127.0.0.1:8000
    make serve MODEL=DIR PORT=8001               # another folder or port
    .venv-serve/bin/python serving/serve.py --model DIR [--port 8000] [--max-images 4] [-- more vLLM options]

It checks the folder first (a clear message instead of an engine trace), prints a `curl` request with a drawn
image, and then becomes the server (`python -m vllm.entrypoints.openai.api_server`). On a GPU machine the same
server is `vllm serve DIR --trust-remote-code --model-impl transformers` (docs/serving.md).
"""

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

#: Head sizes of vLLM 0.32's CPU attention (`CPUAttentionBackend.get_supported_head_sizes`); read from vLLM when
#: it can be imported, this list otherwise.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_folder(folder: Path) -> dict:
    """The folder's config, or SystemExit naming what keeps vLLM from serving it."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"{folder} is not a model folder (no config.json): `make demo` trains one; or pass --model.")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "astrea":
        raise SystemExit(f"{folder} holds a {config.get('model_type')!r} model, not an Astrea one.")
    auto_map = config.get("auto_map") or {}
    missing = [name for name in ("AutoConfig", "AutoModel") if name not in auto_map]
    if missing:
        raise SystemExit(
            f"{folder}/config.json's auto_map lacks {', '.join(missing)}, which vLLM's Transformers backend loads. "
            "Load the model and save it again with this version of Astrea (save_pretrained writes them)."
        )
    for name in ("modeling_astrea.py", "configuration_astrea.py", "processing_astrea.py"):
        if not (folder / name).is_file():
            raise SystemExit(f"{folder} lacks {name}: save the model and its processor with Astrea installed.")
    if config.get("router_mode") == "sample":
        raise SystemExit(
            "This model routes per sample from the prompt (router_mode='sample'); vLLM encodes images without their "
            "prompt, so it would route on the image alone and answer differently from generate(). Serve a per-token "
            "router model (router_mode='token', the default)."
        )
    if config.get("router_prompt"):
        print(
            "note: this model's router also reads the prompt (router_prompt); vLLM encodes images without their "
            "prompt, so here it routes on the image alone, as it was trained to on a share of its images "
            "(router_prompt_dropout). generate() routes with the prompt.",
            file=sys.stderr,
        )
    return config


def check_head_size(config: dict) -> None:
    """On the CPU, vLLM's attention serves only some head sizes: refuse the others before the engine starts."""
    try:
        import torch

        if torch.cuda.is_available():
            return
    except ImportError:
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = tuple(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):
        sizes = CPU_HEAD_SIZES
    text = config.get("text_config", {})
    head = text.get("head_dim") or text.get("hidden_size", 0) // max(1, text.get("num_attention_heads", 1))
    if head not in sizes:
        raise SystemExit(
            f"The LLM's attention heads are {head} wide; vLLM's CPU attention serves head sizes {list(sizes)}. "
            "Serve it on a GPU, or train a model whose LLM has one of those head sizes."
        )


def check_plugin(tensor_parallel_size: int) -> None:
    """Tensor parallelism needs Astrea's vLLM plugin, which keeps the experts whole (serving/vllm_plugin)."""
    from importlib.metadata import entry_points

    if tensor_parallel_size > 1 and "astrea" not in {e.name for e in entry_points(group="vllm.general_plugins")}:
        raise SystemExit(
            "Tensor parallelism needs Astrea's vLLM plugin, which keeps the vision experts whole on every rank: "
            "pip install serving/vllm_plugin (make install-serve does)."
        )


def bind_cpu_threads(tensor_parallel_size: int) -> None:
    """On the CPU, vLLM binds each tensor-parallel worker's threads to a NUMA node and refuses more workers than
    nodes; give each worker its own share of this process's cores instead (`VLLM_CPU_OMP_THREADS_BIND`, unless set)."""
    if tensor_parallel_size < 2 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tensor_parallel_size:
        raise SystemExit(f"Tensor parallel {tensor_parallel_size} needs as many CPU cores; there are {len(cores)}.")
    share = len(cores) // tensor_parallel_size
    groups = [cores[i * share : (i + 1) * share] for i in range(tensor_parallel_size)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, group)) for group in groups)


def quiet_environment() -> Path:
    """vLLM's internal messaging on the loopback, its caches in a new temporary folder (returned), unless set."""
    cache = Path(tempfile.mkdtemp(prefix="astrea-serve-"))
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("HF_HOME", str(cache))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache))
    return cache


def example_image(path: Path) -> Path:
    """A red circle and a blue square on white, for the printed curl request."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 64), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 8, 30, 32), fill=(220, 40, 40))
    draw.rectangle((36, 30, 58, 52), fill=(40, 80, 220))
    image.save(path)
    return path


def curl_example(host: str, port: int, model: str, image: Path) -> str:
    """A shell command: the chat request's JSON in single quotes, the image's base64 spliced in by the shell."""
    model_json = json.dumps(model).replace("'", "'\\''")
    body = (
        '{"model": ' + model_json + ', "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": ['
        '{"type": "image_url", "image_url": {"url": "data:image/png;base64,\'"$(base64 -w0 ' + shlex.quote(str(image))
        + ')"\'"}}, {"type": "text", "text": "What colour is the circle?"}]}]}'
    )
    return f"curl -s http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo/model", help="an Astrea model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-images", type=int, default=4, help="images per request (vLLM's limit_mm_per_prompt)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--memory-fraction", type=float, default=0.3, help="vLLM's --gpu-memory-utilization (on "
                        "the CPU: the share of RAM for weights and KV cache)")
    parser.add_argument("vllm_args", nargs="*", help="more options for vLLM's server, after --")
    args = parser.parse_args(argv)
    if any(arg.startswith(("--tensor-parallel-size", "-tp")) for arg in args.vllm_args):
        parser.error("give --tensor-parallel-size before --, so that it is checked (the plugin, the CPU cores)")

    folder = Path(args.model).resolve()
    config = check_folder(folder)
    check_head_size(config)
    check_plugin(args.tensor_parallel_size)
    bind_cpu_threads(args.tensor_parallel_size)
    image = example_image(quiet_environment() / "example.png")
    print(f"Serving {folder} on http://{args.host}:{args.port} as soon as vLLM reports that its application started.")
    print("Ask it about an image (base64 data URL) with:\n")
    print(curl_example(args.host, args.port, str(folder), image) + "\n", flush=True)

    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--trust-remote-code",
        "--model-impl",
        "transformers",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--limit-mm-per-prompt",
        json.dumps({"image": args.max_images}),
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
        "--gpu-memory-utilization",
        str(args.memory_fraction),
        *args.vllm_args,
    ]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
