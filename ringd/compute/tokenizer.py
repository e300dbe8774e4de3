"""Tokenizer and chat template from a model directory (offline), and streaming detokenizing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ringd.errors import ModelError, UsageError

log = logging.getLogger(__name__)


class Tokenizer:
    """Wraps the model directory's Hugging Face fast tokenizer and chat template."""

    def __init__(self, hf: Any, eos_token_ids: tuple[int, ...], path: Path) -> None:
        self._hf = hf
        self.eos_token_ids = eos_token_ids
        self.path = path

    @classmethod
    def load(cls, model_dir: Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise ModelError(f"{model_dir / 'tokenizer.json'} is missing",
                             hint="re-import or re-copy the model directory")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ModelError(f"cannot load the tokenizer in {model_dir}: {e}",
                             hint="re-import or re-copy the model directory") from None
        eos: list[int] = []
        try:
            cfg = json.loads((model_dir / "config.json").read_text())
            raw = cfg.get("eos_token_id")
            eos += [raw] if isinstance(raw, int) else list(raw or [])
        except (OSError, ValueError):
            pass
        if hf.eos_token_id is not None:
            eos.append(hf.eos_token_id)
        return cls(hf, tuple(dict.fromkeys(eos)), model_dir)

    @property
    def vocab_size(self) -> int:
        return len(self._hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_chat(self, messages: list[dict[str, str]],
                    add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template."""
        import jinja2

        if not self.has_chat_template:
            raise UsageError(f"model {self.path.name} has no chat template",
                             hint="send a plain prompt instead of chat messages")
        try:
            text = self._hf.apply_chat_template(list(messages), tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
            raise UsageError(f"the chat template of {self.path.name} rejected the messages: {e}",
                             hint="messages need 'role' and 'content'; "
                                  "roles alternate user/assistant") from None
        return self.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=True)

    def new_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenizer: ``add(id)`` returns newly printable text.

    Decodes a short window of recent tokens and emits the growth, so spaces that depend
    on neighbouring tokens come out right; text ending in an incomplete UTF-8 sequence
    (U+FFFD) is held back until the next token completes it or ``flush()``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens whose text has been emitted

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """Text still held back (e.g. an incomplete character at the end)."""
        done = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]
