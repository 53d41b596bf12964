"""The RAM++ tagger and its converter, against RAM++'s forward written out here from the released layout.

The state dicts are made in the test with the released key names (recognize-anything's
`ram_plus_swin_large_14m.pth`: Microsoft's Swin under `visual_encoder`, a BERT tag decoder under `tagging_head`)
and random values; `reference_tag_logits` computes RAM++'s `generate_tag` logits from such a dict with plain
torch operations, independently of `AstreaTaggerModel` and of transformers' Swin.
"""

import argparse
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor

from modeling_astrea import AstreaTaggerConfig, AstreaTaggerModel
from modeling_astrea.convert_ram_plus import (
    convert_ram_plus,
    convert_state_dict,
    load_ram_plus_checkpoint,
    main,
    ram_plus_config,
)

TINY = dict(
    patch=4,
    embed=8,
    depths=(2, 2),
    heads=(2, 4),
    window=4,
    tags=5,
    descriptions=3,
    width=12,
    hidden=16,
    layers=2,
    intermediate=24,
    image=32,
)
SWIN_L = dict(
    patch=4,
    embed=192,
    depths=(2, 2, 18, 2),
    heads=(6, 12, 24, 48),
    window=12,
    tags=4585,
    descriptions=51,
    width=512,
    hidden=768,
    layers=2,
    intermediate=3072,
    image=384,
)


def released_state_dict(sizes: dict, device="cpu", seed=0) -> dict[str, torch.Tensor]:
    """A RAM++ state dict with the released names and shapes (buffers included), random values."""
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def add(key, *shape, norm=False):
        if device == "meta":
            state[key] = torch.empty(shape, device="meta")
        elif norm:  # LayerNorm weights near 1
            state[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[key] = 0.2 * torch.randn(shape, generator=generator)

    def linear(key, out, inp, bias=True):
        add(f"{key}.weight", out, inp)
        if bias:
            add(f"{key}.bias", out)

    def layer_norm(key, width):
        add(f"{key}.weight", width, norm=True)
        add(f"{key}.bias", width)

    c, w = sizes["embed"], sizes["window"]
    add("visual_encoder.patch_embed.proj.weight", c, 3, sizes["patch"], sizes["patch"])
    add("visual_encoder.patch_embed.proj.bias", c)
    layer_norm("visual_encoder.patch_embed.norm", c)
    for i, (depth, heads) in enumerate(zip(sizes["depths"], sizes["heads"], strict=True)):
        for j in range(depth):
            block = f"visual_encoder.layers.{i}.blocks.{j}"
            layer_norm(f"{block}.norm1", c)
            add(f"{block}.attn.relative_position_bias_table", (2 * w - 1) ** 2, heads)
            state[f"{block}.attn.relative_position_index"] = torch.zeros(w * w, w * w, dtype=torch.long, device=device)
            linear(f"{block}.attn.qkv", 3 * c, c)
            linear(f"{block}.attn.proj", c, c)
            layer_norm(f"{block}.norm2", c)
            linear(f"{block}.mlp.fc1", 4 * c, c)
            linear(f"{block}.mlp.fc2", c, 4 * c)
            if j % 2:
                state[f"{block}.attn_mask"] = torch.zeros(4, w * w, w * w, device=device)
        if i < len(sizes["depths"]) - 1:
            layer_norm(f"visual_encoder.layers.{i}.downsample.norm", 4 * c)
            linear(f"visual_encoder.layers.{i}.downsample.reduction", 2 * c, 4 * c, bias=False)
            c *= 2
    layer_norm("visual_encoder.norm", c)
    linear("image_proj", sizes["width"], c)
    add("label_embed", sizes["tags"] * sizes["descriptions"], sizes["width"])
    state["reweight_scale"] = torch.tensor(math.log(1 / 0.07), device=device)
    linear("wordvec_proj", sizes["hidden"], sizes["width"])
    for n in range(sizes["layers"]):
        layer = f"tagging_head.encoder.layer.{n}"
        linear(f"{layer}.crossattention.self.query", sizes["hidden"], sizes["hidden"])
        linear(f"{layer}.crossattention.self.key", sizes["hidden"], sizes["width"])
        linear(f"{layer}.crossattention.self.value", sizes["hidden"], sizes["width"])
        linear(f"{layer}.crossattention.output.dense", sizes["hidden"], sizes["hidden"])
        layer_norm(f"{layer}.crossattention.output.LayerNorm", sizes["hidden"])
        linear(f"{layer}.intermediate.dense", sizes["intermediate"], sizes["hidden"])
        linear(f"{layer}.output.dense", sizes["hidden"], sizes["intermediate"])
        layer_norm(f"{layer}.output.LayerNorm", sizes["hidden"])
    linear("fc", 1, sizes["hidden"])
    return state


def reference_tag_logits(
    state: dict, pixels: torch.Tensor, sizes: dict, tag_heads: int = 2, shift_mask: bool = True
) -> torch.Tensor:
    """RAM++'s tag logits (Swin, image projection, description reweighting, tag decoder), from the released dict.
    `shift_mask=False` drops the mask of the shifted windows (to show that the comparison depends on it)."""

    def lin(x, key):
        return F.linear(x, state[f"{key}.weight"], state.get(f"{key}.bias"))

    def ln(x, key, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], state[f"{key}.weight"], state[f"{key}.bias"], eps)

    def attend(q, k, v, heads):  # [B, L, C] each (k, v: [B, S, C]) -> [B, L, C]
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads)
        return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(q.shape)

    def windows(grid, win):  # [B, H, W, C] -> [B * nW, win * win, C]
        b, h, w, c = grid.shape
        return grid.view(b, h // win, win, w // win, win, c).transpose(2, 3).reshape(-1, win * win, c)

    def window_attention(x, block, side, win, shift, heads):
        b, _, c = x.shape
        grid = torch.roll(x.view(b, side, side, c), (-shift, -shift), (1, 2))
        flat = windows(grid, win)  # [B * nW, N, C]
        q, k, v = lin(flat, f"{block}.attn.qkv").chunk(3, dim=-1)
        # relative position bias: table row (dy + win - 1) * (2 win - 1) + (dx + win - 1), for each pair
        ys, xs = (t.flatten() for t in torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij"))
        index = (ys[:, None] - ys[None] + win - 1) * (2 * win - 1) + xs[:, None] - xs[None] + win - 1
        bias = state[f"{block}.attn.relative_position_bias_table"][index].permute(2, 0, 1)  # [heads, N, N]
        if shift:  # tokens rolled in from the other edge may only attend within their own region
            region = torch.tensor([0 if i < side - win else 1 if i < side - shift else 2 for i in range(side)])
            labels = windows((region[:, None] * 3 + region[None])[None, :, :, None].float(), win)[..., 0]
            blocked = (labels[:, :, None] != labels[:, None, :]).float() * -100.0  # [nW, N, N]
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // heads) + bias
        if shift and shift_mask:
            scores = (scores.view(b, -1, heads, win * win, win * win) + blocked[None, :, None]).flatten(0, 1)
        out = lin((scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(flat.shape), f"{block}.attn.proj")
        out = out.view(b, side // win, side // win, win, win, c).transpose(2, 3).reshape(b, side, side, c)
        return torch.roll(out, (shift, shift), (1, 2)).reshape(b, side * side, c)

    x = F.conv2d(
        pixels,
        state["visual_encoder.patch_embed.proj.weight"],
        state["visual_encoder.patch_embed.proj.bias"],
        stride=sizes["patch"],
    )
    batch, side = x.shape[0], x.shape[-1]
    x = ln(x.flatten(2).transpose(1, 2), "visual_encoder.patch_embed.norm")
    for i, (depth, heads) in enumerate(zip(sizes["depths"], sizes["heads"], strict=True)):
        win = min(sizes["window"], side)
        for j in range(depth):
            block = f"visual_encoder.layers.{i}.blocks.{j}"
            shift = win // 2 if j % 2 and side > sizes["window"] else 0
            x = x + window_attention(ln(x, f"{block}.norm1"), block, side, win, shift, heads)
            x = x + lin(F.gelu(lin(ln(x, f"{block}.norm2"), f"{block}.mlp.fc1")), f"{block}.mlp.fc2")
        if i < len(sizes["depths"]) - 1:  # patch merging: the 2x2 neighbours side by side, then halve the grid
            grid = x.view(batch, side, side, -1)
            x = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
            side //= 2
            x = lin(
                ln(x.view(batch, side * side, -1), f"visual_encoder.layers.{i}.downsample.norm"),
                f"visual_encoder.layers.{i}.downsample.reduction",
            )
    x = ln(x, "visual_encoder.norm")
    image_embeds = lin(torch.cat([x.mean(1, keepdim=True), x], 1), "image_proj")  # [B, 1 + N, E]

    pooled = image_embeds[:, 0] / image_embeds[:, 0].norm(dim=-1, keepdim=True)
    labels = state["label_embed"].view(sizes["tags"], sizes["descriptions"], -1)  # [T, D, E]
    weights = (state["reweight_scale"].exp() * pooled @ state["label_embed"].T).view(batch, sizes["tags"], -1)
    tags = (weights.softmax(-1)[..., None] * labels[None]).sum(2)  # [B, T, E]
    queries = F.relu(lin(tags, "wordvec_proj"))
    for n in range(sizes["layers"]):
        layer = f"tagging_head.encoder.layer.{n}"
        cross = f"{layer}.crossattention"
        context = attend(
            lin(queries, f"{cross}.self.query"),
            lin(image_embeds, f"{cross}.self.key"),
            lin(image_embeds, f"{cross}.self.value"),
            tag_heads,
        )
        queries = ln(lin(context, f"{cross}.output.dense") + queries, f"{cross}.output.LayerNorm", 1e-12)
        update = lin(F.gelu(lin(queries, f"{layer}.intermediate.dense")), f"{layer}.output.dense")
        queries = ln(update + queries, f"{layer}.output.LayerNorm", 1e-12)
    return lin(queries, "fc").squeeze(-1)  # [B, T]


TAG_NAMES = ["cat", "dog", "tree", "car", "sky"]


@pytest.fixture(scope="module")
def released():
    state = released_state_dict(TINY)
    config = ram_plus_config(state, TAG_NAMES, image_size=TINY["image"], tag_num_heads=2)
    model = AstreaTaggerModel(config).eval()
    converted, unused = convert_state_dict(state)
    model.load_state_dict(converted)
    return state, model, unused


def test_config_is_read_off_the_released_shapes(released):
    _, model, unused = released
    config, swin = model.config, model.config.vision_config
    assert (swin.embed_dim, swin.depths, swin.num_heads, swin.window_size) == (8, [2, 2], [2, 4], 4)
    assert (config.num_tags, config.descriptions_per_tag, config.tag_embedding_size) == (5, 3, 12)
    assert (config.tag_hidden_size, config.tag_num_layers, config.tag_intermediate_size) == (16, 2, 24)
    assert config.vision_width == 16 and config.tag_names == TAG_NAMES
    assert unused == []  # every tensor has a place; only the recomputed buffers are dropped


def test_tag_logits_match_the_reference_forward(released):
    state, model, _ = released
    pixels = torch.randn(3, 3, TINY["image"], TINY["image"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_tag_logits(state, pixels, TINY)
        torch.testing.assert_close(model(pixels).tag_logits, expected, atol=1e-4, rtol=1e-4)
    assert expected.std() > 0.1  # the logits differ between tags and images: the comparison says something


def test_the_match_depends_on_the_shifted_window_mask(released):
    """Without the mask of the shifted windows (several heads in that stage) the reference differs: the match
    above rests on the shifted windows being computed alike."""
    state, model, _ = released
    pixels = torch.randn(2, 3, TINY["image"], TINY["image"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmasked = reference_tag_logits(state, pixels, TINY, shift_mask=False)
        assert not torch.allclose(unmasked, model(pixels).tag_logits, atol=1e-3)


def test_predict_tags_uses_the_per_tag_thresholds(released):
    state, model, _ = released
    pixels = torch.randn(4, 3, TINY["image"], TINY["image"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs = reference_tag_logits(state, pixels, TINY).sigmoid()
    ranked = probs.sort(dim=0).values
    thresholds = ((ranked[1] + ranked[2]) / 2).tolist()  # per tag: halfway between images, two above it
    model.config.tag_thresholds = thresholds
    try:
        expected = [[TAG_NAMES[t] for t in range(5) if probs[i, t] > thresholds[t]] for i in range(4)]
        assert model.predict_tags(pixels) == expected
        assert any(expected) and not all(len(row) == 5 for row in expected)
        assert model.predict_tags(pixels, threshold=0.0) == [TAG_NAMES] * 4
    finally:
        model.config.tag_thresholds = None


def test_released_swin_large_layout_converts_at_full_size():
    """The real checkpoint's names and shapes (Swin-L/384, 4,585 tags x 51 descriptions) on the meta device."""
    state = released_state_dict(SWIN_L, device="meta")
    config = ram_plus_config(state, [f"t{i}" for i in range(4585)])
    swin = config.vision_config
    assert (swin.embed_dim, swin.depths, swin.num_heads, swin.window_size, swin.image_size) == (
        192,
        [2, 2, 18, 2],
        [6, 12, 24, 48],
        12,
        384,
    )
    assert (config.vision_width, config.descriptions_per_tag, config.tag_hidden_size) == (1536, 51, 768)
    converted, unused = convert_state_dict(state)
    with torch.device("meta"):
        expected = AstreaTaggerModel(config).state_dict()
    assert unused == []
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def write_release(folder, state, thresholds=None):
    """The files a RAM++ user has: the .pth (state dict under "model") and the tag and threshold lists."""
    torch.save({"model": state, "epoch": 4}, folder / "ram_plus.pth")
    (folder / "tags.txt").write_text("\n".join(TAG_NAMES) + "\n")
    if thresholds is not None:
        (folder / "thresholds.txt").write_text("\n".join(str(t) for t in thresholds) + "\n")
    return folder / "ram_plus.pth", folder / "tags.txt", folder / "thresholds.txt"


def test_command_line_converts_a_checkpoint_into_a_loadable_tagger(tmp_path):
    state = released_state_dict(TINY, seed=4)
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    grey = Image.new("L", (20, 30), 90)
    checkpoint, tags, thresholds = write_release(tmp_path, state, [0.5, 0.6, 0.7, 0.8, 0.9])
    command = [
        sys.executable,
        "-m",
        "modeling_astrea.convert_ram_plus",
        "--checkpoint",
        str(checkpoint),
        "--tag-list",
        str(tags),
        "--thresholds",
        str(thresholds),
        "--output",
        str(tmp_path / "out"),
        "--image-size",
        "32",
        "--tag-num-heads",
        "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "5 tags x 3 descriptions" in result.stdout

    model = AstreaTaggerModel.from_pretrained(tmp_path / "out").eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    # RAM++'s transform by hand: bilinear resize to 32x32, scale to [0, 1], ImageNet mean and std
    by_hand = torch.from_numpy(np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float32)) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    by_hand = ((by_hand - mean) / std).permute(2, 0, 1)[None]
    torch.testing.assert_close(pixels, by_hand, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        probs = reference_tag_logits(state, pixels, TINY).sigmoid()[0]
    assert model.config.tag_thresholds == [0.5, 0.6, 0.7, 0.8, 0.9]
    greyscale = processor(images=grey, return_tensors="pt")["pixel_values"]  # converted to RGB, as RAM++ does
    expected_grey = processor(images=grey.convert("RGB"), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(greyscale, expected_grey)
    assert model.predict_tags(pixels) == [
        [n for n, p, t in zip(TAG_NAMES, probs, model.config.tag_thresholds, strict=True) if p > t]
    ]


def test_converter_refuses_what_does_not_fit(tmp_path):
    state = released_state_dict(TINY)
    checkpoint, tags, thresholds = write_release(tmp_path, state, [0.5] * 4)  # one threshold short
    with pytest.raises(ValueError, match="4 lines, the tag list 5"):
        convert_ram_plus(checkpoint, tmp_path / "out", tags, thresholds)
    (tmp_path / "six.txt").write_text("\n".join(TAG_NAMES + ["extra"]))  # 15 rows are not 6 x whole descriptions
    with pytest.raises(ValueError, match="6 tags.*15 rows"):
        convert_ram_plus(checkpoint, tmp_path / "out", tmp_path / "six.txt")
    del state["tagging_head.encoder.layer.1.output.dense.weight"]
    broken, _, _ = write_release(tmp_path, state)
    with pytest.raises(ValueError, match=r"missing \['layers.1.output.weight'\]"):
        convert_ram_plus(broken, tmp_path / "out", tags, image_size=32, tag_num_heads=2)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "junk.pth"), "--tag-list", str(tags), "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_converter_refuses_tensors_outside_the_ram_plus_layout(tmp_path):
    """Only the buffers transformers recomputes (`relative_position_index`, `attn_mask`) are left out; any other
    tensor without a place in the tagger is refused by its released name instead of being dropped."""
    state = released_state_dict(TINY)
    extra = {
        "visual_encoder.absolute_pos_embed": torch.zeros(1, 64, 8),  # Swin with ape=True: dropping it changes outputs
        "visual_encoder.head.weight": torch.zeros(10, 16),  # an ImageNet classifier head: not RAM++
        "visual_encoder.layers.1.downsample.norm.weight": torch.ones(64),  # the last stage merges no patches
    }
    checkpoint, tags, _ = write_release(tmp_path, state | extra)
    with pytest.raises(ValueError, match=r"does not fit the RAM\+\+ layout: unknown tensors") as refused:
        convert_ram_plus(checkpoint, tmp_path / "out", tags, image_size=32, tag_num_heads=2)
    assert all(repr(key) in str(refused.value) for key in extra), refused.value
    assert "missing" not in str(refused.value) and not (tmp_path / "out").exists()
    _, unused = convert_state_dict(state | extra)
    assert unused == ["visual_encoder.absolute_pos_embed", "visual_encoder.head.weight"]


def test_converter_refuses_a_tensor_of_the_wrong_shape(tmp_path):
    """A tensor with a released name and a shape that does not fit the sizes read off the others is refused,
    the message naming the released key, its shape and the shape the tagger needs."""
    state = released_state_dict(TINY)
    _, tags, _ = write_release(tmp_path, state)
    wrong = {
        "visual_encoder.layers.1.blocks.1.mlp.fc2.weight": ((16, 60), (16, 64)),  # fc1 of the block gives 64
        "visual_encoder.layers.0.blocks.0.attn.qkv.weight": ((20, 8), (24, 8)),  # q, k and v of 8 each
        "visual_encoder.layers.0.blocks.1.attn.qkv.weight": ((4, 8), (24, 8)),  # not even three parts
    }
    for key, (shape, needed) in wrong.items():
        checkpoint, _, _ = write_release(tmp_path, state | {key: torch.zeros(shape)})
        with pytest.raises(ValueError, match=r"does not fit the RAM\+\+ layout: wrong shapes") as refused:
            convert_ram_plus(checkpoint, tmp_path / "out", tags, image_size=32, tag_num_heads=2)
        assert f"{key} is {shape}, the tagger needs {needed}" in str(refused.value), refused.value
        assert "missing" not in str(refused.value) and not (tmp_path / "out").exists()


def test_a_checkpoint_holding_pickled_objects_is_read_only_with_trust_checkpoint(tmp_path):
    """`torch.load(weights_only=True)` refuses objects other than tensors and plain containers (here the
    argparse.Namespace training scripts save with their weights): refused with a hint at --trust-checkpoint,
    from Python and from the command line, and read with it."""
    state = released_state_dict(TINY, seed=5)
    _, tags, _ = write_release(tmp_path, state)
    checkpoint = tmp_path / "with_args.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4)}, checkpoint)
    with pytest.raises(ValueError, match=r"pickled argparse\.Namespace.*weights_only=True.*--trust-checkpoint"):
        load_ram_plus_checkpoint(checkpoint)
    loaded = load_ram_plus_checkpoint(checkpoint, trust_checkpoint=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())

    output = tmp_path / "out"
    command = [sys.executable, "-m", "modeling_astrea.convert_ram_plus", "--checkpoint", str(checkpoint)]
    command += ["--tag-list", str(tags), "--output", str(output), "--image-size", "32", "--tag-num-heads", "2"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr
    assert "argparse.Namespace" in refused.stderr and "--trust-checkpoint" in refused.stderr, refused.stderr
    assert not output.exists()
    trusted = subprocess.run([*command, "--trust-checkpoint"], capture_output=True, text=True, timeout=300)
    assert trusted.returncode == 0, trusted.stderr
    model = AstreaTaggerModel.from_pretrained(output)
    assert torch.equal(model.tag_embeddings, state["label_embed"])


def test_tagger_config_checks_its_lists():
    with pytest.raises(ValueError, match="tag_names has 2 entries for num_tags=3"):
        AstreaTaggerConfig(num_tags=3, descriptions_per_tag=1, tag_names=["a", "b"])
    with pytest.raises(ValueError, match=r"tag_thresholds at \[1\] are not probabilities"):
        AstreaTaggerConfig(num_tags=2, descriptions_per_tag=1, tag_thresholds=[0.5, 1.5])
    with pytest.raises(ValueError, match="tag_num_heads=0 must be positive.*tag_dropout=2.0 must be in"):
        AstreaTaggerConfig(tag_num_heads=0, tag_dropout=2.0)
