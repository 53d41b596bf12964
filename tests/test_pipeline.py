"""pipeline("image-text-to-text") from a saved folder, with and without the package (remote code)."""

import os
import subprocess
import sys
import textwrap

import PIL.Image
import pytest
from astrea_testing import BLOCK_PACKAGE
from transformers import pipeline


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder


def chat(image, question="What colour is it?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def test_pipeline_on_a_pil_image_matches_generate(folder):
    pipe = pipeline("image-text-to-text", model=str(folder))
    image = PIL.Image.new("RGB", (50, 20), "blue")
    result = pipe(text=chat(image), max_new_tokens=6, return_full_text=False)
    processor, model = pipe.processor, pipe.model
    prompt = processor.apply_chat_template(chat(image), add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    text = processor.decode(expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result[0]["generated_text"] == text


def test_pipeline_on_a_file_path_and_a_batch_of_chats(folder, tmp_path):
    pipe = pipeline("image-text-to-text", model=str(folder))
    path = tmp_path / "red.png"
    PIL.Image.new("RGB", (40, 30), "red").save(path)
    chats = [
        [{"role": "user", "content": [{"type": "image", "url": str(path)}, {"type": "text", "text": "Colour?"}]}],
        chat(PIL.Image.new("RGB", (120, 33), "green"), "Shape?"),
        chat(PIL.Image.new("RGB", (7, 90), "white"), "Size?"),
    ]
    results = pipe(text=chats, max_new_tokens=4, return_full_text=False)
    assert len(results) == 3
    assert all(isinstance(r[0]["generated_text"], str) for r in results)
    plain = pipe(images=str(path), text="USER: <image>\nColour?\nASSISTANT:", max_new_tokens=4)
    assert plain[0]["generated_text"].startswith("USER: <image>\nColour?\nASSISTANT:")


def test_remote_code_processor_and_pipeline_without_the_package(folder, tmp_path):
    assert {"processing_astrea.py", "image_processing_astrea.py", "modeling_astrea.py"} <= {
        p.name for p in folder.glob("*.py")
    }
    script = BLOCK_PACKAGE + textwrap.dedent(f"""
        import PIL.Image
        from transformers import AutoProcessor, pipeline
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "AstreaProcessor", type(processor)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        pipe = pipeline("image-text-to-text", model={str(folder)!r}, trust_remote_code=True)
        image = PIL.Image.new("RGB", (30, 30), "red")
        messages = [{{"role": "user", "content": [{{"type": "image", "image": image}},
                                                 {{"type": "text", "text": "Colour?"}}]}}]
        out = pipe(text=messages, max_new_tokens=4, return_full_text=False)
        print("PIPELINE-OK", type(pipe.model).__name__, repr(out[0]["generated_text"]))
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PIPELINE-OK AstreaForConditionalGeneration" in result.stdout
