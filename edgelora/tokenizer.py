"""The tokenizer a model carries: a `tokenizers.Tokenizer` plus its chat template and special tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import UnsupportedFormatError


@dataclass
class Tokenizer:
    backend: Any  # tokenizers.Tokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = False
    _template: Any = field(default=None, repr=False, compare=False)

    # -- basic use -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Renders chat messages with the model's own template (Jinja, sandboxed, as transformers does)."""
        if not self.chat_template:
            raise UnsupportedFormatError("this model has no chat template: pass a plain prompt instead of chat messages")
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    # -- Hugging Face files ------------------------------------------------------------------

    def to_json(self) -> str:
        return self.backend.to_str()

    def hf_tokenizer_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "unk_token": self.unk_token,
            "add_bos_token": self.add_bos_token, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg

    @classmethod
    def from_hf_files(cls, tokenizer_json: str, tokenizer_config: dict[str, Any], chat_template: str | None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        def token(v: Any) -> str | None:
            return v.get("content") if isinstance(v, dict) else v

        backend = HFTokenizer.from_str(tokenizer_json)
        template = chat_template or tokenizer_config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(
            backend=backend, chat_template=template,
            bos_token=token(tokenizer_config.get("bos_token")), eos_token=token(tokenizer_config.get("eos_token")),
            pad_token=token(tokenizer_config.get("pad_token")), unk_token=token(tokenizer_config.get("unk_token")),
            add_bos_token=bool(tokenizer_config.get("add_bos_token", False)),
        )
