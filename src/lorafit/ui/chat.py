"""The Chat tab: a run's adapter and its base model answering the same conversation, streamed.

The adapter model comes from ``lorafit.models.load_trained`` (what ``lorafit chat`` loads); the
base model beside it is ``load_model`` on the same run config, a second copy without the adapter
(so it costs the base model's memory once more; the page lets you leave it out). Answers are
``lorafit.inference.generate`` (greedy, stopping at the end of the assistant's turn) streamed
through transformers' ``TextIteratorStreamer``. One model generates at a time: two at once
would only share the same cores.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError
from lorafit.ui.runs import require_adapter

Message = dict[str, str]


class ChatModels:
    """The models of one run, loaded on demand and kept until another run is chosen."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.with_base = False
        self.tokenizer: Any = None
        self.adapter: Any = None
        self.base: Any = None
        self.base_name = ""
        self._lock = threading.Lock()

    def load(self, folder: Path, *, with_base: bool) -> str:
        """Load the run's adapter model (and its base when ``with_base``); returns a summary."""
        from lorafit.models import load_model, load_trained
        from lorafit.models.load import decide_precision

        folder = require_adapter(Path(folder))
        notes: list[str] = []  # what lorafit says while loading (the dtype it picked, ...)
        with self._lock:
            if self.folder != folder or (with_base and self.base is None):
                self.folder = self.adapter = self.base = self.tokenizer = None  # free the old run first
                cfg, tokenizer, adapter = load_trained(folder, echo=notes.append)
                if with_base:  # a second copy, without the adapter, in the dtypes the first loaded in
                    precision = decide_precision(cfg.model, cfg.training_config)
                    base = load_model(cfg.model, tokenizer, precision, echo=notes.append).eval()
                else:
                    base = None
                self.folder, self.tokenizer, self.adapter, self.base = folder, tokenizer, adapter, base
                self.base_name = cfg.model.name_or_path
            self.with_base = with_base
        side = f"; the base model ({self.base_name}) answers beside it" if with_base else ""
        said = "".join(f"\n\n{line}" for line in dict.fromkeys(notes))
        return f"loaded the adapter of {folder.name}{side}{said}"

    def stream(self, which: str, messages: list[Message], max_new_tokens: int) -> Iterator[str]:
        """The answer of the ``"adapter"`` or ``"base"`` model to ``messages``, growing as it streams."""
        from transformers import TextIteratorStreamer

        from lorafit.inference import generate

        model = {"adapter": self.adapter, "base": self.base}[which]
        if model is None:
            raise LorafitError(f"no {which} model loaded; choose a run and press Load")
        with self._lock:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            result: dict[str, Any] = {}

            def work() -> None:
                try:
                    result["answer"] = generate(
                        model, self.tokenizer, messages, max_new_tokens=max_new_tokens, streamer=streamer
                    )
                except BaseException as e:  # handed to the page below; the streamer must still end
                    result["error"] = e
                    streamer.end()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            text = ""
            for piece in streamer:
                text += piece
                yield text
            thread.join()
        if "error" in result:
            raise result["error"]
        yield result["answer"]  # generate's own decoding of the whole answer is the final word

    def reply(
        self,
        message: str,
        histories: dict[str, list[Message]],
        *,
        system: str = "",
        max_new_tokens: int = 256,
    ) -> Iterator[dict[str, list[Message]]]:
        """Append ``message`` to each model's conversation and stream each model's answer.

        Each model continues its own conversation (its earlier answers, not the other's). The
        adapter answers first, then the base model; every update yields both conversations.
        """
        if not message.strip():
            raise LorafitError("empty message; type something to send")
        sides = ["adapter", "base"] if self.with_base and self.base is not None else ["adapter"]
        out = {side: [*histories.get(side, []), {"role": "user", "content": message}] for side in sides}
        for side in sides:
            prompt = ([{"role": "system", "content": system}] if system.strip() else []) + out[side]
            out[side] = [*out[side], {"role": "assistant", "content": ""}]
            for text in self.stream(side, prompt, max_new_tokens):
                out[side][-1] = {"role": "assistant", "content": text}
                yield dict(out)
