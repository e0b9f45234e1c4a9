"""Chat templates rendered as transformers renders them: where the template is found,
the environment HF templates use, and --chat-template."""

from __future__ import annotations

import datetime
import json
import shutil

import pytest
from jinja2.exceptions import TemplateError

from engine.chat_template import InvalidChatTemplate, load_chat_template_arg
from engine.tiny import tiny_model_path
from engine.tokenizer import Tokenizer
from server.args import InvalidServerArgs, ServerArgs, resolve_args

# Loop controls, raise_exception, HF's tojson (no HTML escaping, indent), a namespace and
# whitespace control: what real checkpoints' templates use.
FEATURES = """{%- if messages[0]['role'] == 'bad' %}
  {{- raise_exception('role bad is not allowed') }}
{%- endif %}
{%- for m in messages %}
  {%- if m['role'] == 'stop' %}{% break %}{% endif %}
  {%- if m['role'] == 'skip' %}{% continue %}{% endif %}
  <{{ m['role'] }}>{{ m['content'] | tojson }}
{% endfor %}
{{- {"k": "<x>"} | tojson(indent=2) }}
{%- if add_generation_prompt %}<assistant>{% endif %}"""
MESSAGES = [{"role": "user", "content": "<b>é & \"q\"</b>"}, {"role": "skip", "content": "x"},
            {"role": "assistant", "content": "ok"}, {"role": "stop", "content": "y"},
            {"role": "user", "content": "never"}]


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "tok"
    shutil.copytree(tiny_model_path(), out)
    return out


def _set_config_template(folder, template) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config))


def test_chat_template_jinja_wins_over_tokenizer_config(folder):
    _set_config_template(folder, "from config")
    assert Tokenizer.from_folder(folder).chat_template == "from config"
    (folder / "chat_template.jinja").write_text("from jinja file")
    assert Tokenizer.from_folder(folder).chat_template == "from jinja file"
    assert Tokenizer.from_folder(folder, chat_template="from flag").chat_template == "from flag"


def test_named_templates_use_default(folder):
    _set_config_template(folder, [{"name": "tool_use", "template": "tools"},
                                  {"name": "default", "template": "plain"}])
    assert Tokenizer.from_folder(folder).chat_template == "plain"


def test_rendering_equals_transformers(folder):
    transformers = pytest.importorskip("transformers")
    (folder / "chat_template.jinja").write_text(FEATURES)
    ours = Tokenizer.from_folder(folder).apply_chat_template(MESSAGES)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    # The features did their job (not an accidental agreement on an empty string).
    assert ours == ('  <user>"<b>é & \\"q\\"</b>"\n  <assistant>"ok"\n'
                    '{\n  "k": "<x>"\n}<assistant>')


def test_raise_exception_is_a_template_error(folder):
    (folder / "chat_template.jinja").write_text(FEATURES)
    with pytest.raises(TemplateError, match="role bad is not allowed"):
        Tokenizer.from_folder(folder).apply_chat_template([{"role": "bad", "content": ""}])


def test_strftime_now_and_generation_block(folder):
    (folder / "chat_template.jinja").write_text(
        "{{ strftime_now('%Y') }}|{% generation %}{{ messages[0]['content'] }}{% endgeneration %}")
    text = Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "a"}])
    assert text == f"{datetime.datetime.now().year}|a"


def test_chat_template_kwargs_reach_the_template_and_cannot_replace_its_inputs(folder):
    """A request's ``chat_template_kwargs`` (e.g. Qwen3's ``enable_thinking``) are
    variables of the template; messages, the generation flag and special tokens stay."""
    (folder / "chat_template.jinja").write_text(
        "{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}"
        "{{ messages[0]['content'] }}")
    tok = Tokenizer.from_folder(folder)
    user = [{"role": "user", "content": "a"}]
    assert tok.apply_chat_template(user) == "a"
    assert tok.apply_chat_template(user, True, {"enable_thinking": False}) == "/no_think a"
    with pytest.raises(ValueError, match="cannot set add_generation_prompt, messages"):
        tok.apply_chat_template(user, True, {"messages": [], "add_generation_prompt": False})


def test_chat_template_flag_file_text_or_error(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}!")
    assert load_chat_template_arg(str(path)) == "{{ messages[0]['content'] }}!"
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{{ 'from json' }}"}))
    assert load_chat_template_arg(str(config)) == "{{ 'from json' }}"
    assert load_chat_template_arg("{% for m in messages %}{% endfor %}").startswith("{% for")
    with pytest.raises(InvalidChatTemplate, match="neither a file nor a jinja template"):
        load_chat_template_arg("no-such-file.jinja")
    with pytest.raises(InvalidChatTemplate, match="does not compile"):
        load_chat_template_arg("{% for m in messages %}")
    with pytest.raises(InvalidServerArgs, match="--chat-template"):
        resolve_args(ServerArgs(model_path="tiny", chat_template="{% if %}"))


def test_chat_template_flag_serves_chat(tmp_path):
    from tests.test_server_app import GREEDY, make_args, serve

    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    args = make_args(tmp_path, dp_size=1, chat_template=template)
    with serve(args) as (_, client):
        r = client.post("/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 1, **GREEDY,
            "messages": [{"role": "user", "content": "abc"}]})
        assert r.status_code == 200, r.text
        # The tiny byte-level tokenizer: one token per byte of "[abc]" (the model's own
        # template would give 27); a template writes its own special tokens.
        assert r.json()["usage"]["prompt_tokens"] == len("[abc]")
