"""The collator on conversations: multi-turn label masking token by token, rows without images and with several in
one batch, and the single-turn shorthand giving the same tokens as the same conversation written out."""

import pytest
import torch
from astrea_testing import TINY
from transformers import AutoProcessor

from astrea.training.collator import AstreaCollator, content_parts


class Cache:
    """Stands in for the feature cache: one row per key, its value the key's number, so order is visible."""

    def __init__(self):
        self.loaded = []

    def load(self, keys, experts=None):
        self.loaded.append(list(keys))
        return {"caption": torch.tensor([float(key.removeprefix("k")) for key in keys])}


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(TINY)


def tokens(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_every_assistant_turn_and_nothing_else_is_labelled(processor):
    """System prompt, user turns, image placeholders and the template's words are context; each assistant turn's
    text and end-of-turn token are labels; the newline the template writes after a middle turn is context, and the
    sequence ends with the last turn's end-of-turn token. Expected ids are built here from the template's format
    (USER: / ASSISTANT: lines, the image token repeated per visual token), independently of the collator."""
    collator = AstreaCollator(processor, Cache())
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat colour is it?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And its shape?"},
        {"role": "assistant", "content": "a circle"},
    ]
    batch = collator([{"keys": ["k1"], "messages": messages, "type": "chat"}])
    image = processor.image_token * processor.num_image_tokens
    eos = processor.tokenizer.eos_token
    pieces = [  # (text, labelled?)
        (f"Be brief.\nUSER: {image}\nWhat colour is it?\nASSISTANT:", False),
        (f" red{eos}", True),
        ("\n", False),
        ("USER: And its shape?\nASSISTANT:", False),
        (f" a circle{eos}", True),
    ]
    ids = [t for text, _ in pieces for t in tokens(processor, text)]
    labels = [t if labelled else -100 for text, labelled in pieces for t in tokens(processor, text)]
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    assert batch["expert_features"]["caption"].tolist() == [1.0]


def test_text_only_and_multi_image_rows_share_a_batch(processor):
    """A row without images, one with two and one with one: the features come in placeholder order (row by row,
    left to right), and each row's image tokens are its images' worth."""
    cache = Cache()
    collator = AstreaCollator(processor, cache)
    examples = [
        {"keys": [], "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
        {
            "keys": ["k7", "k3"],
            "messages": [
                {"role": "user", "content": "<image>\nThis one, then <image>\nthat one: same colour?"},
                {"role": "assistant", "content": "no"},
            ],
        },
        {"key": "k5", "prompt": "What shape?", "answer": "square", "type": "shape"},
    ]
    batch = collator(examples)
    assert cache.loaded == [["k7", "k3", "k5"]]
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    per_row = (batch["input_ids"] == image_token).sum(dim=1).tolist()
    assert per_row == [0, 2 * processor.num_image_tokens, processor.num_image_tokens]
    assert (batch["labels"][batch["input_ids"] == image_token] == -100).all()
    # a batch of text-only rows has no expert features at all
    assert "expert_features" not in collator(examples[:1])


def test_the_shorthand_is_the_written_out_conversation(processor):
    collator = AstreaCollator(processor, Cache())
    short = {"key": "k2", "prompt": "How many?", "answer": "two", "type": "count"}
    long = {
        "keys": ["k2"],
        "messages": [{"role": "user", "content": "<image>\nHow many?"}, {"role": "assistant", "content": "two"}],
    }
    a, b = collator([short]), collator([long])
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(a[key], b[key])
    assert torch.equal(
        collator.generation_inputs([short])["input_ids"], collator.generation_inputs([long])["input_ids"]
    )


def test_generation_inputs_stop_before_the_last_assistant_turn(processor):
    collator = AstreaCollator(processor, Cache())
    messages = [
        {"role": "user", "content": "<image>\nColour?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Shape?"},
        {"role": "assistant", "content": "circle"},
    ]
    text = processor.tokenizer.decode(
        collator.generation_inputs([{"keys": ["k1"], "messages": messages}])["input_ids"][0]
    )
    assert text.endswith("USER: Shape?\nASSISTANT:") and "red" in text and "circle" not in text


def test_image_markers_become_parts():
    assert content_parts("<image>\nWhat is it?") == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert content_parts("A <image>\nB<image>") == [
        {"type": "text", "text": "A "},
        {"type": "image"},
        {"type": "text", "text": "B"},
        {"type": "image"},
    ]


def test_a_video_is_one_image_per_frame_as_the_processor_writes_it(processor):
    """A `<video>` of 3 frames: the collator's prompt tokens equal the processor's for the same chat and frames."""
    from PIL import Image

    collator = AstreaCollator(processor, Cache())
    example = {
        "keys": ["k1", "k2", "k3"],
        "frames": [3],
        "messages": [
            {"role": "user", "content": "<video>\nWhat moves?"},
            {"role": "assistant", "content": "the ball"},
        ],
    }
    ours = collator.generation_inputs([example])["input_ids"][0].tolist()
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue")]
    theirs = processor(text=text, videos=[frames], return_tensors="pt")["input_ids"][0].tolist()
    assert ours == theirs
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert ours.count(image_token) == 3 * processor.num_image_tokens


def test_a_moco_caption_is_written_as_a_caption_request_and_pooled_over_the_caption(processor):
    """An example with a `moco_text` (its image's caption) gets MoCo's text in `moco_input_ids`: the caption as the
    answer to the caption request, written as retrieval writes it, pooled over the caption and its end-of-turn
    token; a row without one is all padding there (the model then keeps the row's own text)."""
    from astrea.training.collator import caption_request
    from astrea.training.data import CAPTION_PROMPT

    collator = AstreaCollator(processor, Cache())
    caption = "A large red circle and a small blue square."
    examples = [
        {"key": "k1", "prompt": "How many objects are there?", "answer": "two", "moco_text": caption},
        {"key": "k2", "prompt": "What shape?", "answer": "square"},
    ]
    batch = collator(examples)
    written = [
        {"role": "user", "content": [{"type": "text", "text": CAPTION_PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]
    decode = processor.tokenizer.decode
    first = batch["moco_input_ids"][0][batch["moco_attention_mask"][0].bool()].tolist()
    eos = processor.tokenizer.eos_token
    assert decode(first) == processor.apply_chat_template(written).removesuffix("\n")  # as retrieval writes it
    assert decode(first).endswith(caption + eos)
    pooled = batch["moco_input_ids"][0][batch["moco_pool_mask"][0]].tolist()
    assert decode(pooled).strip() == caption + eos
    assert first == collator.tokenize(caption_request(caption))[0]
    assert not batch["moco_attention_mask"][1].any() and not batch["moco_pool_mask"][1].any()
    # the conversation itself is unchanged, and a batch without captions has no MoCo texts
    without = collator([{k: v for k, v in examples[0].items() if k != "moco_text"}, examples[1]])
    assert torch.equal(without["input_ids"], batch["input_ids"]) and "moco_input_ids" not in without


def test_branches_share_the_image_once_and_keep_each_conversation_whole(processor):
    """Three conversations about one image as one row: the image and the template's words before the first
    question once (branch 0), then each conversation's own tokens and labels, in order, as branches 1..3; the
    image's features load once. The row's tokens are the separate rows' tokens with the shared part cut."""
    collator = AstreaCollator(processor, Cache())
    conversations = [
        [{"role": "user", "content": "<image>\nWhat colour is the circle?"}, {"role": "assistant", "content": "red"}],
        [{"role": "user", "content": "<image>\nHow many objects?"}, {"role": "assistant", "content": "two"}],
        [
            {"role": "user", "content": "<image>\nWhat shape is the red object?"},
            {"role": "assistant", "content": "circle"},
            {"role": "user", "content": "Is it on the left?"},
            {"role": "assistant", "content": "yes"},
        ],
    ]
    alone = [collator([{"keys": ["k4"], "messages": c}]) for c in conversations]
    cache = Cache()
    collator = AstreaCollator(processor, cache)
    batch = collator([{"keys": ["k4"], "branches": conversations, "frames": [], "type": "colour"}])
    assert cache.loaded == [["k4"]]
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    branch_ids = batch["branch_ids"][0]
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    shared = int((branch_ids == 0).sum())
    first = alone[0]["input_ids"][0]
    assert (ids[:shared] == image_token).sum() == processor.num_image_tokens  # the image, once
    assert torch.equal(ids[:shared], first[:shared]) and (labels[:shared] == -100).all()
    for number, single in enumerate(alone, start=1):
        own = branch_ids == number
        assert torch.equal(ids[own], single["input_ids"][0][shared:])
        assert torch.equal(labels[own], single["labels"][0][shared:])
        assert labels[own][0] == -100  # a branch opens with its question, which no label scores
    assert sorted(set(branch_ids.tolist())) == [0, 1, 2, 3] and len(ids) == shared + sum(
        len(s["input_ids"][0]) - shared for s in alone
    )
    assert collator.length({"keys": ["k4"], "branches": conversations}) == len(ids)
    # one conversation in `branches` is an ordinary row, and a batch of those has no branch ids
    plain = collator([{"keys": ["k4"], "branches": conversations[:1], "frames": []}])
    assert "branch_ids" not in plain and torch.equal(plain["input_ids"], alone[0]["input_ids"])


def test_branches_that_differ_before_the_image_are_refused(processor):
    collator = AstreaCollator(processor, Cache())
    conversations = [
        [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}],
        [{"role": "user", "content": "Look: <image>\nColour?"}, {"role": "assistant", "content": "red"}],
    ]
    with pytest.raises(ValueError, match="differ before their last image"):
        collator([{"keys": ["k1"], "branches": conversations}])


def test_image_bundles_group_each_images_conversations(processor):
    """`instruct.image_branches`: conversations about one image, up to N to a row; text-only and multi-image rows
    stay rows of their own; every conversation is in exactly one row; all rows come back in one form."""
    from astrea.training.pipeline import image_bundles

    def chat(question):
        return [{"role": "user", "content": "<image>\n" + question}, {"role": "assistant", "content": "x"}]

    examples = [{"keys": ["k1"], "messages": chat(f"a{i}"), "type": "colour"} for i in range(5)]
    examples += [{"keys": ["k2"], "messages": chat("b0"), "type": "shape"}]
    examples += [{"key": "k3", "prompt": "c0", "answer": "y", "type": "count"}]  # the shorthand form
    examples += [{"keys": [], "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]}]
    examples += [{"keys": ["k1", "k2"], "messages": chat("<image>\nab"), "type": "pair"}]
    bundles = image_bundles(examples, 2, seed=0)
    assert all(set(b) == {"keys", "branches", "frames", "type"} for b in bundles)
    by_keys = {}
    for bundle in bundles:
        by_keys.setdefault(tuple(bundle["keys"]), []).append(len(bundle["branches"]))
    assert sorted(by_keys[("k1",)]) == [1, 2, 2] and by_keys[("k2",)] == [1] and by_keys[("k3",)] == [1]
    assert by_keys[()] == [1] and by_keys[("k1", "k2")] == [1]
    asked = sorted(m["content"] for b in bundles for branch in b["branches"] for m in branch if m["role"] == "user")
    questions = ["a0", "a1", "a2", "a3", "a4", "b0", "c0", "<image>\nab"]
    assert asked == sorted(["<image>\n" + q for q in questions] + ["hi"])
    batch = AstreaCollator(processor, Cache())(bundles)  # one batch of every kind of row
    assert batch["input_ids"].shape[0] == len(bundles) and "branch_ids" in batch


def test_a_row_is_tokenized_once_and_the_callers_copy_is_its_own(processor):
    """Rows repeat every epoch: the second batch of the same examples tokenizes nothing and equals the first, and
    changing a returned row does not change what the next call returns."""
    collator = AstreaCollator(processor, Cache())
    chats = [
        [{"role": "user", "content": "<image>\nWhat colour is the circle?"}, {"role": "assistant", "content": "red"}],
        [{"role": "user", "content": "<image>\nHow many objects?"}, {"role": "assistant", "content": "two"}],
    ]
    examples = [
        {"keys": ["k1"], "branches": chats, "frames": []},
        {"keys": ["k2"], "messages": chats[0]},
        {"key": "k3", "prompt": "Colour?", "answer": "blue"},
    ]
    calls = []
    tokenize = collator.tokenize
    collator.tokenize = lambda *args: calls.append(args) or tokenize(*args)
    first = collator(examples)
    assert len(calls) == 4  # two branches, one conversation, one shorthand
    second = collator(examples)
    assert len(calls) == 4 and first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first if key != "expert_features")
    ids, labels, branch_ids = collator.row(examples[0])
    expected = (list(ids), list(labels), list(branch_ids))
    ids.append(7)
    labels.clear()
    branch_ids[0] = 5
    assert collator.row(examples[0]) == expected
