"""Argument types the benchmarks' command lines share.

Each is an argparse ``type``: it checks one value when the arguments are parsed, so a
value the run cannot use stops the tool at once with an argparse error naming the flag
(exit code 2), instead of a traceback after the run, or a server's log, or a statistic
of nothing.
"""

from __future__ import annotations

import argparse
import os


def positive_int(text: str) -> int:
    """An integer >= 1: a count (rounds, pairs, ranks) a run needs at least one of."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
