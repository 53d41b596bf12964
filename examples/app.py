"""A web demo: upload an image, chat with Astrea (answers stream in), and see how much each expert contributed to
the answer (the router's mean probability per expert, paper Fig. 2).

    python examples/app.py                          # the `make demo` model, or a random tiny one without it
    python examples/app.py --model path/to/astrea   # any Astrea folder
    python examples/app.py --port 7860 --share      # gradio's options

Needs `gradio` (`pip install -e ".[demo]"`; `make app` does it).
"""

import argparse
import queue
import threading
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "outputs" / "demo" / "model"
RANDOM_MODEL = REPO / "outputs" / "tiny-random"


class GenerationError(RuntimeError):
    """The model failed while answering (the experts on the image, or `generate` in its thread); the message names
    the error, which is the cause (`__cause__`)."""


def encode_image(model, experts_only: bool = False, **inputs):
    """`model.get_image_features(**inputs)` (the experts run here, where memory runs out first at real scale), or
    with `experts_only` the experts' features before routing (`get_expert_features`), with a failure raised as a
    GenerationError."""
    try:
        if experts_only:
            return model.get_expert_features(**inputs)
        return model.get_image_features(**inputs, return_dict=True)
    except Exception as error:
        raise GenerationError(f"the experts failed on the image: {type(error).__name__}: {error}") from error


def stream_generate(model, tokenizer, poll_seconds: float = 0.5, **generate_kwargs):
    """Runs `model.generate(**generate_kwargs)` in a thread and yields the new text piece by piece as it arrives.

    If generate fails in its thread (out of memory, a bad input), the stream ends and the error is raised here as a
    GenerationError, where a bare `for piece in TextIteratorStreamer(...)` would wait forever for the end of a stream
    that never comes. The streamer's queue is read with a timeout of `poll_seconds`: each time it runs out, a thread
    that has ended ends the loop, and one still running (a slow model, a long prompt) is waited for, however long.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=poll_seconds)
    failures, abandoned = [], threading.Event()

    class StopWhenAbandoned(StoppingCriteria):
        """Ends generation once the reader has stopped reading (a closed page, a cancelled request)."""

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), abandoned.is_set(), dtype=torch.bool, device=input_ids.device)

    stopping = StoppingCriteriaList([*generate_kwargs.pop("stopping_criteria", []), StopWhenAbandoned()])

    def generate():
        try:
            model.generate(**generate_kwargs, streamer=streamer, stopping_criteria=stopping)
        except BaseException as error:  # any error: the reader below raises it
            failures.append(error)

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    try:
        while True:
            running = worker.is_alive()  # before reading: all a finished thread put in the queue is still read
            try:
                piece = next(streamer)
            except StopIteration:
                break
            except queue.Empty:
                if running:
                    continue
                break
            yield piece
    finally:  # also when the reader stops early (the generator is closed): the thread ends at its next step
        abandoned.set()
    worker.join()
    if failures:
        error = failures[0]
        raise GenerationError(f"generation failed: {type(error).__name__}: {error}") from error


class AstreaChat:
    """The app's logic, without the UI: one image per conversation, answers streamed token by token."""

    def __init__(self, model, processor, max_new_tokens: int = 32):
        self.model, self.processor, self.max_new_tokens = model.eval(), processor, max_new_tokens

    def messages(self, history: list[dict], question: str) -> list[dict]:
        """The chat so far plus the new question; the image sits in the first user turn."""
        turns = [*history, {"role": "user", "content": question}]
        out = []
        for index, turn in enumerate(turns):
            text = turn["content"] if isinstance(turn["content"], str) else str(turn["content"])
            content = [{"type": "text", "text": text}]
            if index == 0:
                content.insert(0, {"type": "image"})
            out.append({"role": turn["role"], "content": content})
        return out

    def router_shares(self, router_probs: torch.Tensor | None) -> dict[str, float]:
        from modeling_astrea import EXPERT_NAMES

        if router_probs is None:
            return dict.fromkeys(EXPERT_NAMES, 0.0)
        shares = router_probs.float().mean(dim=(0, 1))
        return {name: float(share) for name, share in zip(EXPERT_NAMES, shares, strict=True)}

    @torch.no_grad()
    def stream(self, image, history: list[dict], question: str):
        """Yields (answer so far, {expert: share}) as tokens arrive. A missing image or question is a ValueError, a
        failure of the experts or of `generate` a GenerationError (raised when it happens, after the text streamed
        before it)."""
        if image is None:
            raise ValueError("Upload an image first.")
        if not question or not question.strip():
            raise ValueError("Type a question about the image.")
        prompt = self.processor.apply_chat_template(
            self.messages(history, question.strip()), add_generation_prompt=True
        )
        inputs = self.processor(images=[image], text=[prompt], return_tensors="pt")
        pixels = {k: v for k, v in inputs.items() if "pixel" in k or k.startswith("detection_")}
        features = encode_image(
            self.model.model,
            **pixels,
            prompt_input_ids=inputs["input_ids"],
            prompt_attention_mask=inputs["attention_mask"],
        )
        shares = self.router_shares(features.router_probs)
        pieces = stream_generate(
            self.model,
            self.processor.tokenizer,
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            mm_encoder_outputs={"image": features},
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
        )
        answer = ""
        for piece in pieces:
            answer += piece
            yield answer.strip(), shares
        yield answer.strip(), shares


def load(model_path: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_astrea  # noqa: F401  (registers Astrea)

    if not (model_path / "config.json").is_file():
        if model_path != RANDOM_MODEL:
            raise SystemExit(f"--model {model_path}: not a model folder (no config.json).")
        import ask  # examples/ask.py: writes a seeded random tiny Astrea

        print(f"No trained model: writing a random tiny Astrea to {model_path} (its answers are noise).")
        ask.write_random_tiny_model(model_path)
    return AutoModelForImageTextToText.from_pretrained(model_path), AutoProcessor.from_pretrained(model_path)


def build_app(chat: AstreaChat, title: str):
    import gradio as gr
    import pandas as pd

    def chart(shares: dict[str, float]) -> pd.DataFrame:
        return pd.DataFrame({"expert": list(shares), "share": list(shares.values())})

    def respond(image, history, question):
        history = list(history or [])
        try:
            stream = chat.stream(image, history, question)
            turn = [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
            for answer, shares in stream:
                turn[-1] = {"role": "assistant", "content": answer}
                yield [*history, *turn], chart(shares), ""
        except ValueError as error:
            raise gr.Error(str(error)) from None
        except GenerationError as error:
            # the chat as it was and the question back in its box, to try again; the traceback goes to the log
            yield history, gr.skip(), question
            raise gr.Error(f"The model failed while answering ({error}).") from error

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nUpload an image, ask about it; the chart shows each expert's share of the answer.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", elem_id="image")
                plot = gr.BarPlot(
                    chart(chat.router_shares(None)),
                    x="expert",
                    y="share",
                    y_lim=[0, 1],
                    title="Router contribution per expert",
                    elem_id="router-chart",
                )
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=360)
                question = gr.Textbox(label="Question", placeholder="What colour is the circle?", elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("New image / clear", elem_id="clear")
        for trigger in (send.click, question.submit):
            trigger(respond, [image, chatbot, question], [chatbot, plot, question])
        clear.click(lambda: ([], chart(chat.router_shares(None)), None), None, [chatbot, plot, image])
        image.change(lambda: [], None, chatbot)  # a new image starts a new conversation
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Astrea folder (default: outputs/demo/model, else a random tiny)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--share", action="store_true", help="a public gradio.live link")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    path = args.model or (DEMO_MODEL if (DEMO_MODEL / "config.json").is_file() else RANDOM_MODEL)
    model, processor = load(path)
    app = build_app(AstreaChat(model, processor, args.max_new_tokens), f"Astrea ({path.name})")
    app.queue().launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
