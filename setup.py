"""Astrea for Hugging Face Transformers.

Installed import names: `modeling_astrea` (the model; also the remote-code files) and the namespace `astrea`
for the rest: `processing/` -> `astrea.processing`, `training/` -> `astrea.training`,
`evaluation/` -> `astrea.evaluation`, `hub_cards/` -> `astrea.hub_cards`. No generic top-level name such as
`processing` is installed.
"""

from setuptools import setup

setup(
    name="astrea",
    version="0.1.0",
    description="Astrea: a MoE-based vision-language model with progressive alignment, for transformers",
    python_requires=">=3.10",
    packages=["modeling_astrea", "astrea.processing", "astrea.training", "astrea.evaluation", "astrea.hub_cards"],
    package_dir={
        "modeling_astrea": "modeling_astrea",
        "astrea.processing": "processing",
        "astrea.training": "training",
        "astrea.evaluation": "evaluation",
        "astrea.hub_cards": "hub_cards",
    },
    package_data={
        "astrea.hub_cards": ["templates/*.jinja"],
        "astrea.training": ["recipes/*.yaml", "recipes/*/*.yaml"],
    },
    install_requires=[
        "torch>=2.4",  # install with `-c constraints.txt`, which holds torch==2.13.0
        "transformers==5.23.0",
        "tokenizers",
        "safetensors",
        "huggingface_hub",
        "accelerate",
        "pillow",
        "numpy",
        "trl==1.16.0",
        "peft==0.21.2",
        "datasets==5.2.0",
        "pyyaml",
        "matplotlib",
        "pycocoevalcap",  # BLEU and CIDEr, the COCO caption scorers
        "pycocotools",  # COCO polygon and RLE masks (training/sources.py)
    ],
    entry_points={
        "console_scripts": [
            "astrea-train=astrea.training.cli:main",
            "astrea-eval=astrea.evaluation.cli:main",
            "astrea-hub=astrea.hub_cards.cli:main",
            "astrea-data=astrea.training.labeller:main",
        ],
        # `lmms-eval --model astrea` (lmms-eval itself is installed with --no-deps: see the Makefile)
        "lmms_eval.models": ["astrea=astrea.evaluation.lmms_model:manifests"],
    },
    extras_require={
        "dev": ["pytest", "pytest-timeout", "hypothesis", "ruff", "gradio==6.31.0", "playwright"],
        "demo": ["gradio==6.31.0"],
        "gpu": ["flash-attn", "bitsandbytes"],
    },
)
