"""Chat templates: the Jinja template that turns a list of messages into one prompt, found in a file given
with --chat-template or as `chat_template` in the `tokenizer_config.json` beside the tokenizer, and rendered
by transformers' own `apply_chat_template`, so a conversation becomes exactly the text it would in
transformers.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mesh_transformer.errors import UserError
from mesh_transformer.prepare import EOS_CANDIDATES

TOKENIZER_CONFIG = "tokenizer_config.json"


class ChatTemplateError(Exception):
    """A conversation the template refuses (its `raise_exception`) or cannot render."""


class ChatTemplate:
    """A template and the special tokens it may refer to (bos_token, eos_token, ...)."""

    def __init__(self, template: str, tokenizer: Any, special_tokens: dict[str, str] | None = None):
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        self.template = template
        # A private copy: transformers' wrapper may change the tokenizer's padding and truncation settings.
        copy = Tokenizer.from_str(tokenizer.to_str())
        self._renderer = PreTrainedTokenizerFast(tokenizer_object=copy, **(special_tokens or {}))

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for the assistant's next message."""
        try:
            return self._renderer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja2's TemplateError, the template's raise_exception, a bad value
            raise ChatTemplateError(f"the chat template cannot render these messages: {e}") from None


def load_chat_template(
    tokenizer: Any, template_file: str | None = None, tokenizer_path: str | None = None
) -> ChatTemplate | None:
    """The template in `template_file`, else the `chat_template` of the tokenizer_config.json beside
    `tokenizer_path` (a tokenizer.json or its directory), else None. Its special tokens (bos_token,
    eos_token, ...) come from that tokenizer_config.json when there is one."""
    config: dict = {}
    if tokenizer_path is not None:
        folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
        config_path = os.path.join(folder, TOKENIZER_CONFIG)
        if os.path.isfile(config_path):
            try:
                with open(config_path) as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"{config_path}: not a readable JSON file ({e})") from None
    if template_file is not None:
        try:
            with open(template_file) as f:
                template = f.read()
        except OSError as e:
            raise UserError(f"--chat-template {template_file}: {e.strerror}") from None
    else:
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not template:
            return None
    special = {
        key: value["content"] if isinstance(value, dict) else value
        for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        if isinstance(value := config.get(key), (str, dict))
    }
    if "eos_token" not in special:  # the end-of-text token the engine stops at
        special["eos_token"] = next((t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
    special = {key: value for key, value in special.items() if value is not None}
    return ChatTemplate(template, tokenizer, special)
