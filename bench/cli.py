"""Argument types the benchmarks' command lines share.

Each is an argparse ``type``: it checks one value when the arguments are parsed, so a
value the run cannot use stops the tool at once with an argparse error naming the flag
(exit code 2), instead of a traceback after the run, or a server's log, or a statistic
of nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from urllib.parse import urlsplit

from shm.board_layout import MAX_DISPATCHERS as MAX_BOARD_DISPATCHERS
from shm.board_layout import MAX_RANKS as MAX_BOARD_RANKS  # what LoadBoard.create refuses past


def positive_int(text: str) -> int:
    """An integer >= 1: a count (rounds, pairs, ranks) a run needs at least one of."""
    value = _int(text, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless it has none (None, an unset
    switch) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _int(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _float(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def non_negative_int(text: str) -> int:
    """An integer >= 0: a count a run may skip (warm-up requests, repeats)."""
    value = _int(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0: a rate, a duration, a size (not 0, inf or nan)."""
    value = _float(text, "a number > 0")
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0: a jitter, an offset, a share that may be nothing."""
    value = _float(text, "a number >= 0")
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def unit_fraction(text: str) -> float:
    """A number in [0, 1]: a length range ratio, a share."""
    value = _float(text, "a number in [0, 1]")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def open_unit_fraction(text: str) -> float:
    """A number in (0, 1]: a memory fraction, a fraction of capacity."""
    value = _float(text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _int_in(text: str, low: int, high: int, why: str = "") -> int:
    value = _int(text, f"an integer in [{low}, {high}]")
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be in [{low}, {high}]{why}, got {value}")
    return value


def rank_count(text: str) -> int:
    """A number of ranks a load board holds: 1 to ``MAX_BOARD_RANKS``."""
    return _int_in(text, 1, MAX_BOARD_RANKS, " (the load board's limit)")


def dispatcher_count(text: str) -> int:
    """A number of dispatchers (API processes) a board holds: 1 to ``MAX_BOARD_DISPATCHERS``."""
    return _int_in(text, 1, MAX_BOARD_DISPATCHERS, " (the load board's limit)")


def tcp_port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    value = _int(text, "a port in [1, 65535]")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in [1, 65535], got {value}")
    return value


def http_url(text: str) -> str:
    """An http:// or https:// URL with a host (a server's base URL)."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL with a host, "
                                         f"got {text!r}")
    try:
        parts.port  # noqa: B018 (raises on a port out of range)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return text


def model_path(text: str) -> str:
    """What ``engine.serve --model-path`` loads (``engine.model_source``): ``tiny``, a
    folder or ``.gguf`` file that exists, the default model's name or a Hugging Face
    repo id (owner/name); checked without fetching anything."""
    from engine.model_source import DEFAULT_MODEL  # imports no torch
    path = os.path.expanduser(text)
    if text in ("tiny", DEFAULT_MODEL) or os.path.isdir(path):
        return text
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise argparse.ArgumentTypeError(f"{text} is a file but not a .gguf")
        return text
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") != 1
    if looks_like_path:
        raise argparse.ArgumentTypeError(
            f"{text} does not exist (expected 'tiny', a model folder, a .gguf file, "
            f"{DEFAULT_MODEL!r} or a Hugging Face repo id owner/name)")
    return text


def writable_file(text: str) -> str:
    """A path a run writes its figures to when it ends: a file that can be written, or a
    new name in a folder that exists and can be written. Checked before the run, which
    would otherwise end in an error and lose its figures. The file is not created."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path")
    if os.path.exists(text):
        if not os.access(text, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text} cannot be written")
        return text
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist (for {text})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"folder {folder} cannot be written (for {text})")
    return text


def log_folder(text: str) -> str:
    """A folder the run writes server logs into: made now (with its parents) when it does
    not exist, and checked to be writable, so a bad path stops the tool before the servers
    start rather than when they do."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder path, got ''")
    try:
        os.makedirs(text, exist_ok=True)
    except FileExistsError:
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot make {text}: {exc.strerror}") from None
    if not os.access(text, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"folder {text} cannot be written")
    return text


def sim_profile(text: str) -> str:
    """A simulated accelerator's profile as ``engine.serve --sim-profile`` loads it: a
    name in ``sim/profiles/`` or the path to a profile file (``bench/PROFILES.md``)."""
    from sim.executor import load_profile  # here: the tools that never simulate skip it
    try:
        load_profile(text)
    except (ValueError, TypeError, OSError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def out_folder(parser: argparse.ArgumentParser, args: argparse.Namespace,
               summary_name: str) -> str:
    """``--out`` and ``--json`` of a tool that writes a folder of server logs and a
    summary: makes ``OUT/logs`` and checks the summary's path (``--json``, else
    ``OUT/summary_name``) before the run; returns that path. Either one unusable is a
    ``parser.error`` naming its flag."""
    try:
        os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    except OSError as exc:
        parser.error(f"argument --out: cannot make {args.out}/logs: {exc.strerror}")
    path = args.json or os.path.join(args.out, summary_name)
    try:
        writable_file(path)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"argument --json: {exc}")
    return path


def interrupted(what: str) -> int:
    """Ctrl-C in a tool's ``main``: one line on stderr saying what was kept or lost (its
    ``finally`` blocks have already stopped its servers); returns the exit code, 130."""
    print(f"interrupted: {what}", file=sys.stderr)
    return 130
