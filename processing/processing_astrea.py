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
from transformers.processing_utils import ProcessorMixin

from .image_processing_astrea import flatten_images, load_rgb_image

VIDEO_TOKEN = "<video>"


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

    @property
    def unused_input_names(self) -> list[str]:
        return ["num_tiles"]  # only used here, to expand placeholders of tiled images

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        tiles = int(image_inputs["num_tiles"][image_idx])
        return self.image_token * (self.num_image_tokens * tiles)

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
