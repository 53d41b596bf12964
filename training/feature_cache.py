"""The feature cache C of Sec. 3.1.2: features of frozen experts, stored once and reused across stages and runs.

An entry is one image's features from one expert (before its projector, resampled to the common grid), keyed by
the image's content hash, the expert, and a fingerprint of everything that decides the feature: the expert's
config, its weights, its input preprocessing and the grid.

Storage is built for millions of images. Each expert's entries go into shards under
`<root>/<expert>-<fingerprint>/`: a shard is one flat file of rows (half precision by default, one row per image)
read through a memory map, and a small JSON index beside it (the rows' image keys, shape and dtypes). A shard is
written under a temporary name, renamed into place when it is full or the fill ends, and only then gets its index:
an index is the commit, so a killed fill loses at most the shards it had open, and a shard whose size disagrees
with its index (a disk error) is dropped and its entries recomputed. Reads copy one row out of the map and convert
it back to the dtype the expert produced (the operating system's page cache keeps what was read recently).
"""

import hashlib
import json
import multiprocessing
import os
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _ShardWriter:
    """Rows appended to one open shard of one expert: `<id>.bin.partial` until `close` renames it and writes the
    index `<id>.json` (the commit)."""

    def __init__(self, folder: Path, shard_id: str, shape: tuple[int, ...], dtype: torch.dtype, source: torch.dtype):
        self.folder, self.shard_id, self.shape, self.dtype, self.source = folder, shard_id, shape, dtype, source
        self.partial = folder / f"{shard_id}.bin.partial"
        self.handle = open(self.partial, "wb")  # noqa: SIM115 (closed in close())
        self.keys: list[str] = []
        self.bytes = 0

    def append(self, key: str, row: torch.Tensor) -> None:
        data = row.to(self.dtype).contiguous().view(torch.uint8).numpy()
        self.handle.write(memoryview(data.reshape(-1)))
        self.keys.append(key)
        self.bytes += data.nbytes

    def close(self) -> dict:
        self.handle.close()
        os.replace(self.partial, self.folder / f"{self.shard_id}.bin")
        index = {
            "format": 1,
            "keys": self.keys,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "source_dtype": dtype_name(self.source),
        }
        temporary = self.folder / f".{self.shard_id}.json.tmp"
        temporary.write_text(json.dumps(index))
        os.replace(temporary, self.folder / f"{self.shard_id}.json")
        return index


class FeatureCache:
    """Expert features in memory-mapped shards on disk (see the module's docstring); `fill` computes what is
    missing, `load` reads batches of it.

    dtype: how rows are stored (half precision halves the disk and read traffic of float32 features; a feature
    outside float16's range is refused with a pointer to bfloat16). shard_mb: the size at which a shard is closed
    and the next begins."""

    def __init__(
        self,
        root: str | os.PathLike,
        fingerprints: dict[str, str],
        dtype: torch.dtype | str = torch.float16,
        shard_mb: float = 1024,
    ):
        """fingerprints: {expert name: fingerprint} of the experts this cache holds (see `expert_fingerprint`)."""
        self.root = Path(root)
        self.fingerprints = dict(fingerprints)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"The feature cache dtype must be a floating-point dtype such as float16, not {dtype!r}.")
        self.shard_bytes = int(shard_mb * 2**20)
        # hits and misses in shared memory: a DataLoader worker started from this process (`dataloader_num_workers`,
        # in multiprocessing's default start method, as the Trainer starts them) reads through its own copy of the
        # cache, and its reads count here too
        self._counts = multiprocessing.Array("q", 2)
        self._check_writable()
        self.writers: dict[str, _ShardWriter] = {}
        self.shards: dict[str, dict] = {}  # {index path: the shard's index, with its memory map}, opened once
        self.refresh()

    @classmethod
    def for_model(
        cls, root, model, image_processor, experts: Iterable[str] = EXPERT_NAMES, **options
    ) -> "FeatureCache":
        """The cache of this model's experts (`options`: dtype, shard_mb)."""
        return cls(root, {name: expert_fingerprint(model, image_processor, name) for name in experts}, **options)

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

    def folder(self, expert: str) -> Path:
        return self.root / f"{expert}-{self.fingerprints[expert]}"

    # --- reading ---------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the shard indexes on disk (what other processes or runs wrote since this cache was opened)."""
        self.entries: dict[str, dict[str, tuple[str, int]]] = {name: {} for name in self.fingerprints}
        for name in self.fingerprints:
            folder = self.folder(name)
            folder.mkdir(parents=True, exist_ok=True)
            for index_path in sorted(folder.glob("*.json")):
                data = self.shards.get(str(index_path)) or self._open_shard(index_path)
                if data is None:
                    continue
                self.shards[str(index_path)] = data
                for row, key in enumerate(data["keys"]):
                    self.entries[name][key] = (str(index_path), row)

    @staticmethod
    def _open_shard(index_path: Path) -> dict | None:
        """A shard's index and memory map; None (and the shard deleted) when its file does not match its index."""
        data_path = index_path.with_suffix(".bin")
        try:
            data = json.loads(index_path.read_text())
            dtype = getattr(torch, data["dtype"])
            row_bytes = int(np.prod(data["shape"])) * torch.empty((), dtype=dtype).element_size()
            rows = len(data["keys"])
            if data_path.stat().st_size != rows * row_bytes:
                raise ValueError(f"{data_path.stat().st_size} bytes for {rows} rows of {row_bytes}")
            data["map"] = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(rows, row_bytes)) if rows else None
            data["torch_dtype"], data["source"] = dtype, getattr(torch, data["source_dtype"])
            return data
        except Exception as error:  # a damaged shard: drop it, its entries are recomputed
            logger.warning(f"Feature cache shard {data_path} is unreadable ({error}); its entries will be recomputed.")
            index_path.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
            return None

    def __contains__(self, entry: tuple[str, str]) -> bool:
        expert, key = entry
        return key in self.entries[expert]

    def get(self, expert: str, key: str) -> torch.Tensor | None:
        """One entry, in the dtype the expert produced it in; None if it is not in a closed shard."""
        if key not in self.entries[expert]:
            self.count(misses=1)
            return None
        return self.load([key], [expert])[expert][0]

    def load(self, keys: list[str], experts: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Stacked features of these images, in the dtype the experts produced them in: {expert: [len(keys), P, C]}.
        Every entry must exist (see `fill`). The rows are copied from the memory maps straight into one stored-dtype
        batch, converted once."""
        out = {}
        for name in experts or self.fingerprints:
            places = []
            for key in keys:
                where = self.entries[name].get(key)
                if where is None:
                    self.count(misses=1)
                    raise KeyError(
                        f"No cached {name} features for image {key}: fill the cache first (with several processes, "
                        "`cache_dir` must be on storage that all of them see)."
                    )
                places.append((self.shards[where[0]], where[1]))
            first = places[0][0]
            if any(s["shape"] != first["shape"] or s["torch_dtype"] != first["torch_dtype"] for s, _ in places):
                out[name] = torch.stack([self._row(*place) for place in places])  # shards of other layouts
            else:
                batch = torch.empty((len(keys), *first["shape"]), dtype=first["torch_dtype"])
                raw = batch.view(len(keys), -1).view(torch.uint8).numpy()
                for index, (shard, row) in enumerate(places):
                    raw[index] = shard["map"][row]
                out[name] = batch.to(first["source"])
            self.count(hits=len(keys))
        return out

    @staticmethod
    def _row(shard: dict, row: int) -> torch.Tensor:
        raw = torch.from_numpy(np.array(shard["map"][row]))
        return raw.view(shard["torch_dtype"]).reshape(shard["shape"]).to(shard["source"])

    # --- writing ---------------------------------------------------------------------------------------------

    def put(self, expert: str, key: str, feature: torch.Tensor) -> None:
        """Append an entry to this process's open shard of `expert`; readable after `flush` (which `fill` calls)."""
        feature = feature.detach().to("cpu")
        largest = torch.finfo(self.dtype).max
        if largest < torch.finfo(feature.dtype).max and feature.abs().amax() > largest:  # would become inf
            raise ValueError(
                f"The {expert} expert's features reach {feature.abs().max().item():.3g}, beyond {self.dtype}'s range: "
                "store them as bfloat16 or float32 (the recipe's `cache_dtype`)."
            )
        stored = feature.to(self.dtype)
        writer = self.writers.get(expert)
        if writer is not None and (writer.shape != tuple(feature.shape) or writer.bytes >= self.shard_bytes):
            self._close(expert)
            writer = None
        if writer is None:
            rank, _ = process_rank()
            shard_id = f"{rank:04d}-{uuid.uuid4().hex[:12]}"
            writer = _ShardWriter(self.folder(expert), shard_id, tuple(feature.shape), self.dtype, feature.dtype)
            self.writers[expert] = writer
        writer.append(key, stored)

    def _close(self, expert: str) -> None:
        writer = self.writers.pop(expert)
        index_path = writer.folder / f"{writer.shard_id}.json"
        writer.close()
        data = self._open_shard(index_path)
        if data is not None:
            self.shards[str(index_path)] = data
            for row, key in enumerate(data["keys"]):
                self.entries[expert][key] = (str(index_path), row)

    def flush(self) -> None:
        """Close this process's open shards, making their entries readable (to other processes too)."""
        for expert in list(self.writers):
            self._close(expert)

    def disk_bytes(self) -> int:
        """Bytes of the closed shards of this cache's experts."""
        return sum(path.stat().st_size for name in self.fingerprints for path in self.folder(name).glob("*.bin"))

    def __getstate__(self) -> dict:
        """A pickled cache (a spawned DataLoader worker's, or a copy) holds no memory maps: it opens the shards again.
        A worker shares this cache's counts; any other copy starts its own from these."""
        if self.writers:
            raise RuntimeError("A feature cache with open shards cannot be pickled: flush() it first.")
        state = {key: value for key, value in self.__dict__.items() if key not in ("shards", "entries")}
        if multiprocessing.context.get_spawning_popen() is None:  # not a process being started: a copy
            state["_counts"] = list(self._counts)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["_counts"], list):
            state["_counts"] = multiprocessing.Array("q", state["_counts"])
        self.__dict__.update(state)
        self.shards = {}
        self.refresh()

    def count(self, hits: int = 0, misses: int = 0) -> None:
        with self._counts.get_lock():
            self._counts[0] += hits
            self._counts[1] += misses

    @property
    def hits(self) -> int:
        """Entries read, by this process and the DataLoader workers started from it."""
        return self._counts[0]

    @property
    def misses(self) -> int:
        """Entries asked for and not cached (computed by `fill`; an error in `load`), counted like `hits`."""
        return self._counts[1]

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
        for leftover in self.root.glob(f"*/{rank:04d}-*.bin.partial"):  # this rank's shards of a killed fill
            leftover.unlink(missing_ok=True)
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
            missing = [name for name in experts if (name, key) not in self]
            self.count(hits=len(experts) - len(missing), misses=len(missing))
            if missing:
                pending.append((key, image, missing))
                if len(pending) == batch_size:
                    run_experts()
        if pending:
            run_experts()
        self.flush()
        progress.close()
        if world > 1:
            torch.distributed.barrier()  # every share written before anyone reads
            self.refresh()
        logger.info(f"Feature cache {self.root}: {self.stats()}")
        return self.stats()


__all__ = ["FeatureCache", "expert_fingerprint", "image_key"]
