"""AstreaImageProcessor: one image in, the inputs of all four experts out.

Each expert sees the image at its own resolution and normalisation (SigLIP: 384^2, mean/std 0.5; RAM++:
384^2, ImageNet; Grounding DINO: 800^2, ImageNet; SAM2: 1024^2, ImageNet), under the pixel-input names the
model's `forward` takes. PIL/NumPy only: no torchvision.

Inputs are checked here, at the boundary: file paths, PIL images, NumPy arrays and torch tensors are accepted;
every PIL mode is converted to RGB (alpha composited on white, 16-bit and float scaled to 8 bits); unreadable,
truncated, empty or decompression-bomb images raise a ValueError that names the image.

This file imports only transformers, PIL and NumPy, so it also works as remote code next to saved weights.
"""

import os
import warnings

import numpy as np
import PIL.Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature, select_best_resolution
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs

#: Same names and order as `modeling_astrea.EXPERT_NAMES` / `PIXEL_INPUT_NAMES` (a test checks they agree); kept
#: here so this file needs nothing but transformers.
EXPERT_NAMES = ("caption", "classification", "detection", "segmentation")
PIXEL_INPUT_NAMES = {
    "caption": "pixel_values",
    "classification": "classification_pixel_values",
    "detection": "detection_pixel_values",
    "segmentation": "segmentation_pixel_values",
}
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def _describe(index: int, source) -> str:
    return f"image {index} ({source})" if isinstance(source, (str, os.PathLike)) else f"image {index}"


def _bomb(index: int, source, detail: str) -> ValueError:
    return ValueError(
        f"{_describe(index, source)}: {detail} is larger than PIL's decompression-bomb limit "
        f"({PIL.Image.MAX_IMAGE_PIXELS} pixels); downscale it first or raise PIL.Image.MAX_IMAGE_PIXELS."
    )


def _open(path, index: int) -> PIL.Image.Image:
    if not os.path.isfile(path):
        raise ValueError(f"{_describe(index, path)}: no such file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(path)
    except PIL.Image.UnidentifiedImageError:
        raise ValueError(f"{_describe(index, path)}: not an image file PIL can read.") from None
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise _bomb(index, path, "the image") from error
    return _decode(image, index, path)


def _decode(image: PIL.Image.Image, index: int, source=None) -> PIL.Image.Image:
    """Force PIL's lazy decoding now, so a truncated file or a decompression bomb fails here and says so."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image.load()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        raise _bomb(index, source, f"{image.width}x{image.height}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{_describe(index, source)}: corrupt or truncated image data ({error}).") from None
    return image


def _array_to_pil(array: np.ndarray, index: int) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"image {index}: an array image must be HxW, HxWxC or CxHxW with 1, 3 or 4 channels, "
            f"got shape {tuple(array.shape)}."
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float64))
        array = np.clip(array * 255.0 if array.max(initial=0) <= 1.0 else array, 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        peak = 65535 if array.max(initial=0) > 255 else 255
        array = (np.clip(array.astype(np.float64), 0, peak) * (255.0 / peak)).round().astype(np.uint8)
    return PIL.Image.fromarray(array)


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _array_to_pil(np.asarray(image), 0).convert("RGB")
    return image.convert("RGB")


def load_rgb_image(image, index: int = 0) -> PIL.Image.Image:
    """Any accepted image input -> a decoded RGB PIL image; a ValueError/TypeError naming the image otherwise."""
    if isinstance(image, (str, os.PathLike)):
        image = _open(image, index)
    elif isinstance(image, PIL.Image.Image):
        image = _decode(image, index)
    elif isinstance(image, np.ndarray) or type(image).__module__.startswith("torch"):
        array = image.detach().cpu().numpy() if hasattr(image, "detach") else image
        image = _array_to_pil(array, index)
    else:
        raise TypeError(
            f"image {index}: expected a PIL image, a NumPy array, a torch tensor or a file path, got "
            f"{type(image).__name__}."
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {index}: empty ({image.width}x{image.height}).")
    return _to_rgb(image)


def flatten_images(images) -> list:
    """Nested lists/tuples of images (and 4-D batches) -> a flat list, in order."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    if getattr(images, "ndim", 0) == 4:  # a batch as one array/tensor
        return list(images)
    return [images]


class AstreaImageProcessorKwargs(ImagesKwargs, total=False):
    """
    expert_sizes (`dict[str, int]`): side of the square each expert's input is resized to, by expert name.
    expert_image_mean, expert_image_std (`dict[str, list[float]]`): each expert's normalisation.
    do_anyres (`bool`): LLaVA-NeXT-style tiling: the whole image plus tiles of it at the best-fitting resolution
        from `image_grid_pinpoints`; every tile is one more image for the experts (off by default).
    image_grid_pinpoints (`list[list[int]]`): candidate (height, width) resolutions for tiling.
    anyres_tile_size (`int`): side of one tile in those resolutions.
    """

    expert_sizes: dict[str, int]
    expert_image_mean: dict[str, list[float]]
    expert_image_std: dict[str, list[float]]
    do_anyres: bool
    image_grid_pinpoints: list[list[int]]
    anyres_tile_size: int


class AstreaImageProcessor(PilBackend):
    valid_kwargs = AstreaImageProcessorKwargs
    model_input_names = [*PIXEL_INPUT_NAMES.values(), "num_tiles"]

    resample = PILImageResampling.BICUBIC
    # the caption expert's size and normalisation; each expert's own are in expert_sizes / expert_image_*
    size = {"height": 384, "width": 384}
    image_mean = list(SIGLIP_MEAN)
    image_std = list(SIGLIP_STD)
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    expert_sizes = {"caption": 384, "classification": 384, "detection": 800, "segmentation": 1024}
    expert_image_mean = {
        "caption": list(SIGLIP_MEAN),
        "classification": list(IMAGENET_DEFAULT_MEAN),
        "detection": list(IMAGENET_DEFAULT_MEAN),
        "segmentation": list(IMAGENET_DEFAULT_MEAN),
    }
    expert_image_std = {
        "caption": list(SIGLIP_STD),
        "classification": list(IMAGENET_DEFAULT_STD),
        "detection": list(IMAGENET_DEFAULT_STD),
        "segmentation": list(IMAGENET_DEFAULT_STD),
    }
    do_anyres = False
    anyres_tile_size = 384
    image_grid_pinpoints = [[384, 768], [768, 384], [768, 768], [384, 1152], [1152, 384]]

    @classmethod
    def from_model_config(cls, config, detection_size: int = 800, **kwargs) -> "AstreaImageProcessor":
        """Sizes read off an `AstreaConfig`'s experts (Grounding DINO's input size is not in its config)."""
        segmentation_size = config.segmentation_config.backbone_config.image_size
        sizes = {
            "caption": config.caption_config.image_size,
            "classification": config.classification_config.vision_config.image_size,
            "detection": detection_size,
            "segmentation": segmentation_size[0] if isinstance(segmentation_size, list) else segmentation_size,
        }
        side = sizes["caption"]
        kwargs.setdefault("anyres_tile_size", side)
        kwargs.setdefault("image_grid_pinpoints", [[side * h, side * w] for h, w in ((1, 2), (2, 1), (2, 2))])
        return cls(expert_sizes=sizes, size={"height": side, "width": side}, **kwargs)

    def preprocess(self, images, *args, **kwargs) -> BatchFeature:
        images = [load_rgb_image(image, index) for index, image in enumerate(flatten_images(images))]
        if not images:
            raise ValueError("No images given.")
        return super().preprocess(images, *args, **kwargs)

    @staticmethod
    def tile_grid(height: int, width: int, pinpoints: list[list[int]], tile: int) -> tuple[int, int]:
        """(rows, columns) of tiles that anyres cuts a height x width image into (besides the whole image)."""
        best_height, best_width = select_best_resolution((height, width), pinpoints)
        return best_height // tile, best_width // tile

    def num_tiles(self, height: int, width: int, do_anyres: bool | None = None, **kwargs) -> int:
        """How many expert inputs a height x width image becomes: 1, or with anyres the whole image and its tiles.
        Keyword arguments override the processor's own settings, as in `preprocess`."""
        if not (self.do_anyres if do_anyres is None else do_anyres):
            return 1
        pinpoints = kwargs.get("image_grid_pinpoints") or self.image_grid_pinpoints
        rows, cols = self.tile_grid(height, width, pinpoints, kwargs.get("anyres_tile_size") or self.anyres_tile_size)
        return 1 + rows * cols

    def _tiles(self, image: np.ndarray, pinpoints: list[list[int]], tile: int) -> list[np.ndarray]:
        """The whole image, then the tiles of the best-fitting pinpoint resolution (channels-first arrays)."""
        height, width = image.shape[-2:]
        # cut the image into the pinpoint's grid of tiles, in the image's own pixels
        rows, cols = self.tile_grid(height, width, pinpoints, tile)
        edges_y = np.linspace(0, height, rows + 1).round().astype(int)
        edges_x = np.linspace(0, width, cols + 1).round().astype(int)
        tiles = [image]
        for r in range(rows):
            for c in range(cols):
                y0, y1 = edges_y[r], max(edges_y[r + 1], edges_y[r] + 1)
                x0, x1 = edges_x[c], max(edges_x[c + 1], edges_x[c] + 1)
                tiles.append(image[:, y0:y1, x0:x1])
        return tiles

    def _preprocess(
        self,
        images,
        do_resize: bool,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        return_tensors=None,
        expert_sizes: dict[str, int] | None = None,
        expert_image_mean: dict[str, list[float]] | None = None,
        expert_image_std: dict[str, list[float]] | None = None,
        do_anyres: bool = False,
        image_grid_pinpoints: list[list[int]] | None = None,
        anyres_tile_size: int = 384,
        **kwargs,
    ) -> BatchFeature:
        num_tiles = []
        if do_anyres:
            tiled = [self._tiles(image, image_grid_pinpoints, anyres_tile_size) for image in images]
            num_tiles = [len(tiles) for tiles in tiled]
            images = [tile for tiles in tiled for tile in tiles]
        data = {}
        for name in EXPERT_NAMES:
            side = expert_sizes[name]
            processed = []
            for image in images:  # channels-first numpy arrays
                if do_resize:
                    image = self.resize(image, SizeDict(height=side, width=side), resample=resample)
                if do_rescale:
                    image = self.rescale(image, rescale_factor)
                if do_normalize:
                    image = self.normalize(image, expert_image_mean[name], expert_image_std[name])
                processed.append(image)
            data[PIXEL_INPUT_NAMES[name]] = processed
        data["num_tiles"] = num_tiles or [1] * len(images)
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["AstreaImageProcessor", "load_rgb_image"]
