"""Chat templates rendered as transformers renders them.

Where a checkpoint keeps its template (``chat_template_from_folder``): newer checkpoints
write ``chat_template.jinja``, which wins; older ones the ``chat_template`` key of
``tokenizer_config.json`` (a string, or a list of named templates: "default" is used).
``--chat-template`` (``load_chat_template_arg``) overrides both: a file path, or the
template text itself.

The environment is transformers' (``_compile_jinja_template``): a sandbox with
trim_blocks and lstrip_blocks, the loop-controls extension (``break``/``continue``),
``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML and takes
indent/separators/sort_keys, and the ``{% generation %}`` block (rendered as its body:
the assistant mask it marks is for training only).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.config import ModelLoadError

TEMPLATE_FILE = "chat_template.jinja"


class InvalidChatTemplate(ValueError):
    """``--chat-template`` is neither a readable file nor a template that compiles."""


def chat_template_from_folder(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    path = folder / TEMPLATE_FILE
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"cannot read {path}: {e}") from e
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_chat_template_arg(value: str) -> str:
    """The template ``--chat-template`` names: a file's text, or ``value`` itself when it
    is template text; either must compile."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidChatTemplate(f"cannot read {path}: {e}") from None
        if path.suffix == ".json":  # a tokenizer_config.json-style file
            try:
                text = chat_template_from_folder(Path("/nonexistent"), json.loads(text)) or ""
            except json.JSONDecodeError as e:
                raise InvalidChatTemplate(f"{path} is not valid JSON: {e}") from None
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise InvalidChatTemplate(f"{value!r} is neither a file nor a jinja template")
    from jinja2.exceptions import TemplateError
    try:
        compile_template(text)
    except TemplateError as e:
        raise InvalidChatTemplate(f"the template does not compile: {e}") from None
    return text


def render_chat_template(template: str, **context: Any) -> str:
    return compile_template(template).render(**context)


@functools.lru_cache(maxsize=8)
def compile_template(template: str):
    return _environment().from_string(template)


@functools.lru_cache(maxsize=8)
def iterates_content(template: str) -> bool:
    """Whether the template loops over a message's ``content`` (``{% for part in
    message['content'] %}``): it expects OpenAI's list of parts, not a string (SGLang
    tells the two kinds apart the same way)."""
    from jinja2 import nodes

    def names_content(node) -> bool:
        while isinstance(node, nodes.Filter):  # message['content'] | selectattr(...)
            node = node.node
        if isinstance(node, nodes.Getattr):
            key = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            key = node.arg.value
        else:
            return False
        return key == "content" and isinstance(node.node, nodes.Name)

    return any(names_content(loop.iter)
               for loop in _environment().parse(template).find_all(nodes.For))


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_block(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.cache
def _generation_block() -> type:
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}``: renders the body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return GenerationBlock
