"""The tiny model's tokenizer, built here offline (no Hub): a byte-level BPE trained on a small built-in corpus.

Byte-level means no text is ever out of vocabulary; the corpus only decides which merges exist. The image
placeholder `<image>` is a special token, so it is never split.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .processing_astrea import CHAT_TEMPLATE

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]  # ids 0..3, matching the tiny text config

_WORDS = (
    "a an the is are there of in on at to and or with without what which where how many much does do this that "
    "image picture photo shows contains left right top bottom above below middle center largest smallest "
    "biggest object objects shape shapes colour color background yes no one two three four five six seven "
    "eight nine ten zero red green blue yellow orange purple pink white black gray grey brown cyan magenta "
    "circle square triangle rectangle star ellipse diamond hexagon cross ring small medium large big tiny "
    "caption tags boxes box region regions mask segmentation detection classification describe answer "
    "question user assistant please briefly of near next between count number"
)


def _corpus():
    """Lines in the chat template's format (`USER: ...\nASSISTANT: ...</s>`) over the word list, repeated so that
    every word, its capitalised form and the template's words win merges as whole tokens (as an LLM's tokenizer
    has "colour" or "circle" as one token; left to chance, "circle" and "cross" were both "c" + a rest), then
    number-bearing lines for the digits of boxes and counts."""
    words = _WORDS.split()
    for _ in range(20):
        for i, word in enumerate(words):
            second, third = words[(i * 7) % len(words)], words[(i * 13) % len(words)]
            yield (
                f"USER: What {word} is the {second} {third}?\nASSISTANT: {word.capitalize()} {second}.</s>\n"
                f"USER: How {third}?\nASSISTANT: {third}</s>"
            )
    for i, word in enumerate(words):
        yield f"{word} {words[(i * 7) % len(words)]} {words[(i * 13) % len(words)]}, {i} ({i}, {i * 3})."


def build_tiny_tokenizer(vocab_size: int = 768) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
