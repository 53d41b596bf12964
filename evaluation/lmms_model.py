"""Astrea as an lmms-eval model: `lmms-eval --model astrea --model_args pretrained=<folder> ...`.

lmms-eval's own `huggingface` model cannot load Astrea (it falls back to `AutoModel`, which has no LM head), so
this class is registered under the name `astrea` through the `lmms_eval.models` entry point in setup.py.
It is a "simple" lmms-eval model: each request brings the task's prompt text and its images (`doc_to_visual`);
the prompt goes through the folder's chat template with one `<image>` per image, and answers are greedy unless
the task asks for sampling (or beam search); the task's `until` strings cut the answers. `loglikelihood` (the
`loglikelihood` and `multiple_choice` task types) sums the log probabilities of the continuation's tokens after
the templated prompt. Under `accelerate launch` each process takes the GPU of its `LOCAL_RANK`; lmms-eval shards
the requests itself.

Install lmms-eval without its dependencies (it hard-requires torchvision, which cannot work beside this torch):
`make install` does it; elsewhere `pip install -c constraints.txt --no-deps lmms-eval==0.7.3` and then the
`LMMS_EVAL_DEPS` of the Makefile.
"""

import os

import torch
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm


def manifests():
    """The `lmms_eval.models` entry point: lmms-eval resolves `--model astrea` through it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="astrea", simple_class_path="astrea.evaluation.lmms_model.Astrea")]


class Astrea(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        batch_size: int | str = 1,
        dtype: str = "auto",
        trust_remote_code: bool | str = False,
        **kwargs,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import modeling_astrea  # noqa: F401  (registers Astrea with the Auto classes)

        unknown = sorted(set(kwargs) - {"max_length", "max_batch_size"})
        if unknown:
            raise ValueError(
                f"astrea: unknown --model_args {unknown}; known: pretrained, device, batch_size, dtype, "
                "trust_remote_code"
            )
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"astrea: --batch_size must be a positive number, got {batch_size!r}")
        if device is None:  # under `accelerate launch`, each process on its own GPU (lmms-eval shards the requests)
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, dtype)
        remote = str(trust_remote_code).lower() in ("true", "1")
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=remote)
        self.model = (
            AutoModelForImageTextToText.from_pretrained(pretrained, dtype=dtype, trust_remote_code=remote)
            .to(device)
            .eval()
        )
        self.device = torch.device(device)
        self.batch_size_per_gpu = int(batch_size)

    # --- inputs ------------------------------------------------------------------------------------------

    def _prompt(self, context: str, num_images: int) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _doc(self, request) -> dict | None:
        if len(request.args) < 6:  # acc_mutual_info's unconditional requests: ("", continuation)
            return None
        doc_id, task, split = request.args[3:6]
        return self.task_dict[task][split][doc_id]

    def _visuals(self, request) -> list:
        """The request's images, flattened (tasks may nest lists or leave Nones); image paths stay paths, which
        the processor opens."""

        def flat(items):
            for item in items or []:
                if isinstance(item, (list, tuple)):
                    yield from flat(item)
                elif item is not None:
                    yield item

        doc = self._doc(request)
        return list(flat(request.args[2](doc))) if doc is not None and request.args[2] is not None else []

    def _inputs(self, texts: list[str], images: list) -> dict:
        inputs = self.processor(
            images=images or None, text=texts, padding=True, padding_side="left", return_tensors="pt"
        )
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    # --- lmms-eval's interface -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        # one batch per generation settings, in request order within it
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        bar = tqdm(total=len(requests), desc="astrea generate", disable=self.rank != 0)
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            generate = {"max_new_tokens": int(settings.pop("max_new_tokens", 128))}
            if (beams := int(settings.pop("num_beams", 1) or 1)) > 1:
                generate["num_beams"] = beams
            temperature = float(settings.pop("temperature", 0) or 0)
            if settings.pop("do_sample", False) or temperature > 0:
                generate.update(do_sample=True, temperature=temperature or 1.0, top_p=settings.pop("top_p", None))
            else:
                generate["do_sample"] = False
            for start in range(0, len(indices), self.batch_size_per_gpu):
                chunk = indices[start : start + self.batch_size_per_gpu]
                texts, images = [], []
                for index in chunk:
                    visuals = self._visuals(requests[index])
                    texts.append(self._prompt(requests[index].args[0], len(visuals)))
                    images.extend(visuals)
                batch = self._inputs(texts, images)
                output = self.model.generate(**batch, **generate)
                new_tokens = output[:, batch["input_ids"].shape[1] :]
                decoded = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
                for index, text in zip(chunk, decoded, strict=True):
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    answers[index] = text.strip()
                    self.cache_hook.add_partial("generate_until", requests[index].args, answers[index])
                bar.update(len(chunk))
        bar.close()
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum of the continuation tokens' log probabilities after the templated prompt, whether greedy decoding
        would produce exactly them), per request. The requests of one prompt and document (a multiple-choice
        question's options) share one encoding of its images: the experts run once per question, not per option.
        Each continuation is tokenized on its own and appended to the prompt's ids, so no token straddles the
        boundary."""
        tokenizer = self.processor.tokenizer
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.args[0], *request.args[3:6]), []).append(index)
        for indices in tqdm(groups.values(), desc="astrea loglikelihood", disable=self.rank != 0):
            first = requests[indices[0]]
            visuals = self._visuals(first)
            prompt = self._inputs([self._prompt(first.args[0], len(visuals))], visuals)
            prompt_ids, prompt_mask = prompt.pop("input_ids"), prompt.pop("attention_mask")
            encoded = {}
            if visuals:  # the experts, the router and the adapters, once for every continuation of this prompt
                features = self.model.get_image_features(
                    **prompt, prompt_input_ids=prompt_ids, prompt_attention_mask=prompt_mask, return_dict=True
                )
                encoded["image"] = features
            for index in indices:
                continuation = requests[index].args[1]
                if callable(continuation):  # `output_type: loglikelihood` passes the task's doc_to_target
                    continuation = continuation(self._doc(requests[index]))
                continuation = continuation[0] if isinstance(continuation, list) else str(continuation)
                target = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
                if target.numel() == 0:
                    raise ValueError(f"astrea: the continuation {continuation!r} has no tokens")
                target = target.to(self.device)
                output = self.model(
                    input_ids=torch.cat([prompt_ids, target], dim=1),
                    attention_mask=torch.cat([prompt_mask, torch.ones_like(target)], dim=1),
                    mm_encoder_outputs=encoded,
                )
                logits = output.logits[0, prompt_ids.shape[1] - 1 : -1].float()  # the continuation's predictions
                log_probs = logits.log_softmax(-1).gather(-1, target[0, :, None]).squeeze(-1)
                results[index] = (float(log_probs.sum()), bool((logits.argmax(-1) == target[0]).all()))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("astrea: multi-round generation tasks are not supported yet")


__all__ = ["Astrea", "manifests"]
