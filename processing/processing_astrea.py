"""AstreaProcessor: image processor + tokenizer + chat template.

- Each image placeholder `<image>` becomes `num_image_tokens` image tokens (576 at the paper's 24x24 grid), times
  the number of tiles when the image processor tiles (`do_anyres`).
- A video is a list of frames (PIL images or arrays, or one T x H x W x C array); `num_frames` of them are sampled
  uniformly and each becomes an image, so `<video>` becomes `num_frames` images' worth of image tokens.
- Batches are padded (on the tokenizer's side: left for the shipped tokenizers, as generation needs).
- Placeholder counts must match the images and videos given; prompts must not be empty; a video must have frames.

This file imports only transformers and NumPy, so it also works as remote code next to saved weights.
"""

import re

import numpy as np
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .image_processing_astrea import flatten_images, load_rgb_image

VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"

#: Vicuna-style chat: "USER: <image>\nquestion\nASSISTANT: answer</s>" (the tokenizer's EOS ends a turn). Content may
#: be a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts, as transformers' chat
#: messages are.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}\n"
    "{% else %}{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}"
    # a placeholder typed into a text part would stand for an image nobody attached (serving: an HTTP 400)
    "{% if '<image>' in part['text'] or '<video>' in part['text'] %}{{ raise_exception('A text part of the message "
    "holds an image or video placeholder (<image>, <video>): attach each image or video as its own part instead.') }}"
    "{% endif %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def sample_frames(frames, num_frames: int) -> list:
    """`num_frames` frames spread uniformly over the video (all of them when it has fewer)."""
    frames = list(frames)
    if len(frames) <= num_frames:
        return frames
    return [frames[i] for i in np.linspace(0, len(frames) - 1, num_frames).round().astype(int)]


def _is_single_video(videos) -> bool:
    """A list of frames (images or 3-D arrays), as opposed to a list of videos."""
    if getattr(videos, "ndim", 0) == 4:
        return True
    return (
        isinstance(videos, (list, tuple))
        and len(videos) > 0
        and not isinstance(videos[0], (list, tuple))
        and (getattr(videos[0], "ndim", 3) == 3)
    )


class AstreaProcessor(ProcessorMixin):
    text_kwargs = {"padding": True}

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_image_tokens: int = 576,
        image_token: str = "<image>",
        video_token: str = VIDEO_TOKEN,
        num_frames: int = 8,
        **kwargs,
    ):
        """num_image_tokens: visual tokens per image (the model's `config.num_image_tokens`);
        num_frames: frames sampled from each video."""
        self.num_image_tokens = num_image_tokens
        self.num_frames = num_frames
        self.video_token_text = video_token
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_experts(
        cls,
        llm,
        caption,
        classification,
        detection,
        segmentation,
        *,
        image_grid_size: int = 24,
        detection_size: int = 800,
        chat_template: str | None = None,
    ) -> "AstreaProcessor":
        """The processor of `AstreaForConditionalGeneration.from_experts` on the same parts (folders or Hub ids).

        The tokenizer is the LLM's, padding on the left, with `<image>` added when it lacks one (the model side adds
        the matching embedding row). Each expert's input side comes from its model config, the size its weights
        were built for: SigLIP and the tagger at their `image_size`, SAM2 at its backbone's `image_size`, Grounding
        DINO at `detection_size` (its own processor resizes the shortest edge to 800). Its mean and std come from
        its processor config (`preprocessor_config.json`) where the folder has one, else they are the expert's
        usual ones. `chat_template` defaults to Vicuna's USER/ASSISTANT turns;
        `image_grid_size` must match the model's (24 by default: 576 visual tokens per image).
        """
        from transformers import AutoTokenizer, PreTrainedConfig
        from transformers.image_processing_base import ImageProcessingMixin

        from .image_processing_astrea import AstreaImageProcessor

        tokenizer = AutoTokenizer.from_pretrained(llm, padding_side="left")
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
            tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token

        def model_config(path, outer: str, *inner: str) -> dict:
            config = PreTrainedConfig.get_config_dict(path)[0]
            if config.get("model_type") == outer:  # a whole model's checkpoint: its vision part
                for key in inner:
                    config = config.get(key, {})
            return config

        def normalisation(path, name: str) -> tuple[list[float], list[float]]:
            try:
                processor_config = ImageProcessingMixin.get_image_processor_dict(path)[0]
            except OSError:  # no preprocessor_config.json: the expert's usual normalisation
                processor_config = {}
            mean = processor_config.get("image_mean", AstreaImageProcessor.expert_image_mean[name])
            std = processor_config.get("image_std", AstreaImageProcessor.expert_image_std[name])
            return list(mean), list(std)

        segmentation_side = model_config(segmentation, "sam2", "vision_config").get("backbone_config", {})
        segmentation_side = segmentation_side.get("image_size", 1024)
        sizes = {
            "caption": model_config(caption, "siglip", "vision_config").get("image_size", 224),
            "classification": model_config(classification, "").get("vision_config", {}).get("image_size", 384),
            "detection": detection_size,
            "segmentation": segmentation_side[0] if isinstance(segmentation_side, list) else segmentation_side,
        }
        paths = {"caption": caption, "classification": classification, "detection": detection}
        paths["segmentation"] = segmentation
        means, stds = {}, {}
        for name, path in paths.items():
            means[name], stds[name] = normalisation(path, name)
        side = sizes["caption"]
        image_processor = AstreaImageProcessor(
            expert_sizes=sizes,
            expert_image_mean=means,
            expert_image_std=stds,
            size={"height": side, "width": side},
            image_mean=means["caption"],
            image_std=stds["caption"],
            anyres_tile_size=side,
            image_grid_pinpoints=[[side * h, side * w] for h, w in ((1, 2), (2, 1), (2, 2))],
        )
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template or CHAT_TEMPLATE,
            num_image_tokens=image_grid_size**2,
            image_token=IMAGE_TOKEN,
        )

    @property
    def unused_input_names(self) -> list[str]:
        return ["num_tiles"]  # only used here, to expand placeholders of tiled images

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        tiles = int(image_inputs["num_tiles"][image_idx])
        return self.image_token * (self.num_image_tokens * tiles)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """For serving engines (vLLM): per (height, width) image, its image tokens and its rows of expert inputs
        (1, or with anyres the whole image and its tiles), without processing any pixels."""
        if image_sizes is None:
            return MultiModalData()
        options = {k: v for k, v in kwargs.items() if k in ("do_anyres", "image_grid_pinpoints", "anyres_tile_size")}
        tiles = [self.image_processor.num_tiles(int(h), int(w), **options) for h, w in image_sizes]
        return MultiModalData(num_image_tokens=[self.num_image_tokens * t for t in tiles], num_image_patches=tiles)

    def _check_text(self, text) -> list[str]:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}.")
        if not texts:
            raise ValueError("text is an empty list: give at least one prompt.")
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(f"Empty prompt at position {empty[0]} of the batch: every prompt needs some text.")
        return list(texts)

    def _videos_to_images(self, images, texts: list[str], videos) -> tuple[list, list[str]]:
        """Turn each `<video>` into `<image>` per sampled frame, and interleave the frames with the images in
        the order their placeholders appear in the text."""
        videos = [videos] if _is_single_video(videos) else list(videos)
        sampled = []
        for index, video in enumerate(videos):
            frames = sample_frames(video, self.num_frames)
            if not frames:
                raise ValueError(f"video {index} has no frames.")
            sampled.append(frames)
        n_video_tokens = sum(t.count(self.video_token_text) for t in texts)
        if n_video_tokens != len(sampled):
            raise ValueError(
                f"The prompts hold {n_video_tokens} {self.video_token_text} placeholders but {len(sampled)} videos "
                "were given."
            )
        flat_images = flatten_images(images) if images is not None else []
        n_image_tokens = sum(t.count(self.image_token) for t in texts)
        if n_image_tokens != len(flat_images):
            raise ValueError(
                f"The prompts hold {n_image_tokens} {self.image_token} tokens and {len(flat_images)} images were "
                "given."
            )
        image_iter, video_iter = iter(flat_images), iter(sampled)
        pattern = re.compile(f"({re.escape(self.image_token)}|{re.escape(self.video_token_text)})")
        merged, new_texts = [], []
        for text in texts:
            pieces = []
            for piece in pattern.split(text):
                if piece == self.video_token_text:
                    frames = next(video_iter)
                    merged.extend(frames)
                    piece = self.image_token * len(frames)
                elif piece == self.image_token:
                    merged.append(next(image_iter))
                pieces.append(piece)
            new_texts.append("".join(pieces))
        return merged, new_texts

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if text is not None:
            text = self._check_text(text)
        if videos is not None:
            if text is None:
                raise ValueError("Videos need a prompt with a <video> placeholder for each of them.")
            images, text = self._videos_to_images(images, text, videos)
        if images is not None:  # decode and check every image here, before anything else touches it
            images = [load_rgb_image(image, index) for index, image in enumerate(flatten_images(images))]
        return super().__call__(images=images, text=text, **kwargs)


__all__ = ["AstreaProcessor", "sample_frames"]
