"""S1: serving through vLLM against `generate()` (`make bench-serve`, and `make bench` when the serving environment
is installed).

    python benchmarks/serve.py [--model outputs/demo/model] [--requests 64] [--concurrency 8]

The same held-out questions of the synthetic set (`astrea-eval synthetic`), N at a time: as N concurrent streamed
chat requests to vLLM's OpenAI server (`serving/serve.py`), and through `generate()` in batches of N, both in the
serving environment on the same machine. Reports requests per second and median time to first token for each, and
their ratios (server over generate). The model is the `make demo` one when it exists, else a random servable tiny
one. Writes `benchmarks/serve_results.json`.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "serving"))
sys.path.insert(0, str(REPO / "tests"))

from launch import SERVE_PYTHON, running_server  # noqa: E402
from serve import check_folder, check_head_size  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "outputs" / "demo" / "model"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "serve_results.json"))
    args = parser.parse_args(argv)
    if not SERVE_PYTHON.exists():
        raise SystemExit("The serving environment is missing: run `make install-serve`.")

    work = Path(tempfile.mkdtemp(prefix="astrea-bench-serve-"))
    model = Path(args.model)
    try:
        check_head_size(check_folder(model))
    except SystemExit as refusal:
        from astrea_testing import save_servable_tiny

        print(f"Not serving {model} ({refusal}); benchmarking a random servable tiny Astrea instead")
        model = save_servable_tiny(work / "model")
    subprocess.run(
        [sys.executable, "-m", "astrea.evaluation.cli", "synthetic", "--output", str(work / "bench"), "--num-images",
         str(args.requests)],
        check=True,
        capture_output=True,
    )
    result_file = work / "result.json"
    with running_server(model, "--dtype", "float32", "--enforce-eager") as (url, _):
        subprocess.run(
            [str(SERVE_PYTHON), str(REPO / "serving" / "vllm_check.py"), "bench", "--url", url, "--model", str(model),
             "--requests", str(work / "bench" / "vqa.jsonl"), "--limit", str(args.requests), "--concurrency",
             str(args.concurrency), "--output", str(result_file)],
            check=True,
        )
    result = {"id": "S1", "model": str(model), **json.loads(result_file.read_text())}
    Path(args.output).write_text(json.dumps(result, indent=1))
    server, generate, ratio = result["server"], result["generate"], result["ratio"]
    print(
        f"S1 ({result['requests']} requests, {result['concurrency']} at a time): vLLM server "
        f"{server['requests_per_second']:.2f} req/s, TTFT {server['ttft_median_s'] * 1000:.0f} ms; generate() "
        f"{generate['requests_per_second']:.2f} req/s, TTFT {generate['ttft_median_s'] * 1000:.0f} ms; ratio "
        f"{ratio['requests_per_second']:.2f}x throughput, {ratio['ttft']:.2f}x time to first token"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
