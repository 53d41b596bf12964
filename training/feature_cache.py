"""The feature cache C of Sec. 3.1.2: features of frozen experts, stored once and reused across stages and runs.

An entry is one image's features from one expert (before its projector, resampled to the common grid), keyed by
the image's content hash, the expert, and a fingerprint of everything that decides the feature: the expert's
config, its weights, its input preprocessing and the grid. Entries are safetensors files written to a temporary
name and renamed into place (`os.replace` is atomic), so a killed run never leaves a half-written entry under a
real name; an entry that fails to load anyway (a disk error) is dropped and recomputed.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers.utils import logging

from modeling_astrea import EXPERT_NAMES

logger = logging.get_logger(__name__)


def image_key(image: Image.Image) -> str:
    """Content hash of an image: its pixels, size and mode (not its file name or format)."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:32]


def expert_fingerprint(model, image_processor, expert: str) -> str:
    """Hash of what decides an expert's cached feature: config, weights, preprocessing and the common grid."""
    digest = hashlib.sha256()
    digest.update(model.config.expert_config(expert).to_json_string().encode())
    digest.update(str(model.config.image_grid_size).encode())
    if expert == "detection":
        digest.update(str(model.config.detection_feature_level).encode())
        digest.update(str(model.config.detection_prompt_ids).encode())
    preprocessing = {
        key: getattr(image_processor, key)[expert] for key in ("expert_sizes", "expert_image_mean", "expert_image_std")
    }
    preprocessing["resample"] = int(image_processor.resample)
    digest.update(json.dumps(preprocessing, sort_keys=True).encode())
    for name, tensor in model.model.experts[expert].state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(weight_summary(tensor).numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def weight_summary(tensor: torch.Tensor, whole_up_to: int = 2**20, samples: int = 2**16) -> torch.Tensor:
    """What of a weight tensor goes into a fingerprint: all of it up to `whole_up_to` values, else `samples` evenly
    spaced values (first and last included). Exact values, so the same weights give the same fingerprint in every
    process, whatever its threads (a floating-point sum would not); and cheap: hashing every byte of the real
    experts took seconds at each start. Fine-tuning, another checkpoint or a reinitialisation changes the sampled
    values too; a change confined to values between the samples of a large tensor would go unnoticed."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() > whole_up_to:
        flat = flat[torch.arange(samples, device=flat.device) * (flat.numel() - 1) // (samples - 1)]
    return flat.to("cpu", torch.float32).contiguous()


def process_rank() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class FeatureCache:
    """Expert features on disk under `root/<expert>-<fingerprint>/<key[:2]>/<key>.safetensors`, and the entries
    read so far in memory, up to `memory_mb` megabytes (later epochs then read no files)."""

    def __init__(self, root: str | os.PathLike, fingerprints: dict[str, str], memory_mb: float = 1024):
        """fingerprints: {expert name: fingerprint} of the experts this cache holds (see `expert_fingerprint`)."""
        self.root = Path(root)
        self.fingerprints = dict(fingerprints)
        self.hits = self.misses = 0
        self.memory_budget = int(memory_mb * 2**20)
        self.memory: dict[tuple[str, str], torch.Tensor] = {}
        self.memory_used = 0
        self._check_writable()

    @classmethod
    def for_model(
        cls, root, model, image_processor, experts: Iterable[str] = EXPERT_NAMES, memory_mb: float = 1024
    ) -> "FeatureCache":
        return cls(root, {name: expert_fingerprint(model, image_processor, name) for name in experts}, memory_mb)

    def _check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as error:
            raise ValueError(
                f"The feature cache directory {self.root} is not writable ({error.strerror or error}); choose "
                "another with `cache_dir` in the recipe or --cache-dir."
            ) from None

    def path(self, expert: str, key: str) -> Path:
        return self.root / f"{expert}-{self.fingerprints[expert]}" / key[:2] / f"{key}.safetensors"

    def get(self, expert: str, key: str) -> torch.Tensor | None:
        feature = self.memory.get((expert, key))
        if feature is not None:
            self.hits += 1
            return feature
        path = self.path(expert, key)
        if path.exists():
            try:
                feature = load_file(path)["feature"]
                self.hits += 1
                size = feature.numel() * feature.element_size()
                if self.memory_used + size <= self.memory_budget:
                    self.memory[(expert, key)] = feature
                    self.memory_used += size
                return feature
            except Exception as error:  # a damaged file: drop it, recompute
                logger.warning(f"Feature cache entry {path} is unreadable ({error}); recomputing it.")
                path.unlink(missing_ok=True)
        self.misses += 1
        return None

    def put(self, expert: str, key: str, feature: torch.Tensor) -> None:
        path = self.path(expert, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key}-", suffix=".tmp")
        os.close(handle)
        try:
            save_file({"feature": feature.detach().to("cpu").contiguous()}, temporary)
            os.replace(temporary, path)  # atomic: readers see the old state or the whole entry
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 4)}

    @torch.no_grad()
    def fill(
        self, model, image_processor, images: Iterable[Image.Image], batch_size: int = 32, desc: str = "feature cache"
    ) -> dict[str, float]:
        """Make sure every image has every cached expert's features, running the experts only on the misses;
        read them back with `load`. Returns (and logs) this process's hit statistics.

        The images stream through: at most `batch_size` of them wait for the experts at a time. Under
        torch.distributed (a shared `root`) each process fills its own share of the images (by their content hash)
        and all wait for each other at the end, so every process can then read every entry; each image's experts
        run once in all, not once per process."""
        experts = list(self.fingerprints)
        rank, world = process_rank()
        device = next(model.parameters()).device
        pending: list[tuple[str, Image.Image, list[str]]] = []
        seen = set()
        progress = tqdm(desc=desc, unit="image", disable=None)

        def run_experts():
            needed = sorted({name for _, _, names in pending for name in names}, key=experts.index)
            inputs = image_processor([image for _, image, _ in pending], return_tensors="pt")
            inputs = {k: v.to(device) for k, v in inputs.items() if k != "num_tiles"}
            features = model.model.get_expert_features(**inputs, experts=tuple(needed))
            for row, (key, _, names) in enumerate(pending):
                for name in names:
                    self.put(name, key, features[name][row])
            progress.update(len(pending))
            pending.clear()

        for image in images:
            key = image_key(image)
            if key in seen or int(key[:8], 16) % world != rank:  # seen, or another process's share
                seen.add(key)
                continue
            seen.add(key)
            missing = [name for name in experts if not self.path(name, key).exists()]
            self.hits += len(experts) - len(missing)
            self.misses += len(missing)
            if missing:
                pending.append((key, image, missing))
                if len(pending) == batch_size:
                    run_experts()
        if pending:
            run_experts()
        progress.close()
        if world > 1:
            torch.distributed.barrier()  # every share written before anyone reads
        logger.info(f"Feature cache {self.root}: {self.stats()}")
        return self.stats()

    def load(self, keys: list[str], experts: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Stacked features of these images: {expert: [len(keys), P, C]}. Every entry must exist (see `fill`)."""
        out = {}
        for name in experts or self.fingerprints:
            rows = []
            for key in keys:
                feature = self.get(name, key)
                if feature is None:
                    raise KeyError(
                        f"No cached {name} features for image {key}: fill the cache first (with several processes, "
                        "`cache_dir` must be on storage that all of them see)."
                    )
                rows.append(feature)
            out[name] = torch.stack(rows)
        return out


__all__ = ["FeatureCache", "expert_fingerprint", "image_key"]
