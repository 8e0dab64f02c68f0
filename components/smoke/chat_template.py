"""A model's chat template, found in its tokenizer files and rendered the way transformers renders it.

The smoke test shows (and checks that there is) the prompt as the model sees it. Rendering here with Jinja2
directly, in the sandbox and with the helpers `apply_chat_template` gives templates
(transformers/utils/chat_template_utils.py, v5.23.0), spares the smoke step transformers, numpy and
tokenizers: the serving engine does the real templating; this only has to agree with it, which
tests/test_smoke_test.py checks against transformers itself.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

# The special tokens transformers passes to every template (SpecialTokensMixin.SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _named(template: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {name, template} where "default" is the one."""
    if isinstance(template, str):
        return template or None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return None


def find_template(tokenizer_dir: Path) -> str | None:
    """The default chat template in a tokenizer directory, looked up in the order transformers loads it:
    chat_template.jinja, then chat_template.json, then tokenizer_config.json; None when there is none."""
    jinja_file = tokenizer_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text() or None
    from_json = _named(_read_json(tokenizer_dir / "chat_template.json").get("chat_template"))
    if from_json:
        return from_json
    return _named(_read_json(tokenizer_dir / "tokenizer_config.json").get("chat_template"))


def special_tokens(tokenizer_dir: Path) -> dict[str, str]:
    """bos_token, eos_token... as strings: tokenizer_config.json, then special_tokens_map.json."""
    tokens: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins, as in transformers
        for key, value in _read_json(tokenizer_dir / name).items():
            if key in _SPECIAL_TOKENS:
                content = value.get("content") if isinstance(value, dict) else value
                if isinstance(content, str):
                    tokens[key] = content
    return tokens


def render(template: str, messages: list[dict[str, Any]], tokens: dict[str, str]) -> str:
    """The template applied to messages with add_generation_prompt, as apply_chat_template(tokenize=False) does."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=messages, tools=None, documents=None, add_generation_prompt=True, **tokens
    )
