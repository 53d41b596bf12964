"""AstreaImageProcessor: one image in, the inputs of all four experts out.

Each expert sees the image at its own resolution and normalisation (SigLIP: 384^2, mean/std 0.5; RAM++:
384^2, ImageNet; Grounding DINO: 800^2, ImageNet; SAM2: 1024^2, ImageNet), under the pixel-input names the
model's `forward` takes. PIL/NumPy only: no torchvision.
"""

from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs

from modeling_astrea import EXPERT_NAMES, PIXEL_INPUT_NAMES, AstreaConfig

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class AstreaImageProcessorKwargs(ImagesKwargs, total=False):
    """
    expert_sizes (`dict[str, int]`): side of the square each expert's input is resized to, by expert name.
    expert_image_mean, expert_image_std (`dict[str, list[float]]`): each expert's normalisation.
    """

    expert_sizes: dict[str, int]
    expert_image_mean: dict[str, list[float]]
    expert_image_std: dict[str, list[float]]


class AstreaImageProcessor(PilBackend):
    valid_kwargs = AstreaImageProcessorKwargs
    model_input_names = list(PIXEL_INPUT_NAMES.values())

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

    @classmethod
    def from_model_config(cls, config: AstreaConfig, detection_size: int = 800, **kwargs) -> "AstreaImageProcessor":
        """Sizes read off the experts' configs (Grounding DINO's input size is not in its config: 800 by default)."""
        segmentation_size = config.segmentation_config.backbone_config.image_size
        sizes = {
            "caption": config.caption_config.image_size,
            "classification": config.classification_config.vision_config.image_size,
            "detection": detection_size,
            "segmentation": segmentation_size[0] if isinstance(segmentation_size, list) else segmentation_size,
        }
        return cls(expert_sizes=sizes, size={"height": sizes["caption"], "width": sizes["caption"]}, **kwargs)

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
        **kwargs,
    ) -> BatchFeature:
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
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["AstreaImageProcessor"]
