"""Checks that need CUDA, in a few minutes: ranks on their GPUs, KV sized by fraction.

    python -m bench.cuda_check [--model-path tiny] [--mem-fraction-static 0.5]

1. ``python -m engine.gpu_probe`` lists the GPUs torch sees; with none, one line says
   so and the exit code is 1.
2. A plain server with ``--dp-size 2`` (with one GPU: ``--allow-gpu-sharing``):
   - each rank's device in ``/server_info`` is the planned one: cuda:0 and cuda:1
     (one GPU: cuda:0 twice);
   - each rank's KV pool is ``fraction x free memory / ranks on that GPU - weights``
     over the bytes per token (``server.memory``), within 3% (free memory at launch
     moves a little between this probe and the server's);
   - a greedy request on each rank (``routed_dp_rank``) gives the same text, twice.
3. ``--disaggregation-mode pd`` on CUDA ends at once with one line and exit code 1:
   the KV hand-off between PD ranks is shared memory, CPU only (no CUDA IPC yet). The
   placement of PD ranks on GPUs is covered on CPU by tests/test_placement.py.

One line per check (PASS/FAIL), then a summary; exit code 0 only if all passed. Each
server runs in its own process group and is stopped (SIGTERM, then SIGKILL) whatever
happens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from bench.cli import model_path, open_unit_fraction, positive_float

from engine.config import load_model_config
from server.memory import DTYPE_BYTES, GpuMemory, format_bytes, probe_gpus, weight_bytes

PROMPT = "The capital of France is"
KV_TOLERANCE = 0.03


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)
        if not ok:
            self.failed.append(name)
        return ok


class Server:
    """``python -m engine.serve`` in its own process group, on a free port."""

    def __init__(self, flags: list[str], timeout_s: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="cuda_check_", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--port",
                                      str(self.port), *flags], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.timeout_s = timeout_s

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if get(self.url + "/health", 2.0)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not healthy after {self.timeout_s:.0f} s:\n{self.tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def tail(self, lines: int = 20) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return "".join(f.readlines()[-lines:])


def get(url: str, timeout_s: float = 30.0) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.status, json.loads(r.read())


def post(url: str, body: dict, timeout_s: float = 120.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}


def greedy(url: str, rank: int | None = None) -> str:
    body = {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 16}}
    if rank is not None:
        body["routed_dp_rank"] = rank
    status, out = post(url + "/generate", body)
    if status != 200:
        raise RuntimeError(f"/generate answered {status}: {out}")
    return out["text"]


def expected_kv_tokens(model_path: str, gpu: GpuMemory, fraction: float, sharing: int) -> int:
    config = load_model_config(model_path)
    dtype_bytes = DTYPE_BYTES[config.dtype]
    static = int(fraction * gpu.free_bytes) // sharing
    return (static - weight_bytes(config, dtype_bytes)) // config.kv_bytes_per_token(dtype_bytes)


def check_plain(checks: Checks, args, gpus: list[GpuMemory]) -> None:
    devices = ["cuda:0", "cuda:1"] if len(gpus) >= 2 else ["cuda:0", "cuda:0"]
    flags = ["--model-path", args.model_path, "--device", "cuda", "--dp-size", "2",
             "--mem-fraction-static", str(args.mem_fraction_static)]
    if len(gpus) < 2:
        flags.append("--allow-gpu-sharing")
    with Server(flags, args.timeout_s) as server:
        _, info = get(server.url + "/server_info")
        ranks = info["ranks"]
        checks.check("plain: each rank on its planned GPU", [r["device"] for r in ranks] == devices,
                     f"got {[r['device'] for r in ranks]}, planned {devices}")
        sharing = 2 if len(gpus) < 2 else 1
        for rank, device in zip(ranks, devices):
            gpu = gpus[int(device.split(":")[1])]
            want = expected_kv_tokens(args.model_path, gpu, args.mem_fraction_static, sharing)
            got = rank["max_total_num_tokens"]
            checks.check(f"plain: rank {rank['dp_rank']} KV sized by --mem-fraction-static",
                         abs(got - want) <= KV_TOLERANCE * want,
                         f"{got} tokens, expected {want} ({args.mem_fraction_static} of "
                         f"{format_bytes(gpu.free_bytes)} free on {device}"
                         + (", shared by 2 ranks)" if sharing > 1 else ")"))
        texts = [greedy(server.url, r) for r in (0, 1, 0, 1)]
        checks.check("plain: greedy text equal on both ranks and repeatable",
                      len(set(texts)) == 1, f"{texts[0]!r}" if len(set(texts)) == 1 else f"{texts}")


def check_pd_refused(checks: Checks, args) -> None:
    """PD's KV hand-off is shared memory (CPU): on CUDA the launch is refused up front."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "engine.serve", "--port", str(port),
                           "--model-path", args.model_path, "--device", "cuda",
                           "--disaggregation-mode", "pd", "--dp-size", "1"],
                          capture_output=True, text=True, timeout=args.timeout_s)
    lines = done.stderr.strip().splitlines()
    checks.check("pd on cuda: refused before start, one line, exit code 1",
                 done.returncode == 1 and len(lines) == 1 and "CUDA IPC" in lines[0],
                 f"exit {done.returncode}: {lines[-1] if lines else 'no output'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=model_path, default="tiny",
                        help="the model each server loads (engine.serve --model-path; "
                             "default: %(default)s)")
    parser.add_argument("--mem-fraction-static", type=open_unit_fraction, default=0.5,
                        help="share of GPU memory for weights and KV, in (0, 1] "
                             "(default: %(default)s)")
    parser.add_argument("--timeout-s", type=positive_float, default=300.0,
                        help="bound on each server's start-up, seconds (default: %(default)s)")
    args = parser.parse_args(argv)
    gpus = probe_gpus()
    if not gpus:
        print("FAIL no CUDA device visible to torch: this check needs one", flush=True)
        return 1
    print("GPUs: " + ", ".join(f"cuda:{i} {g.name} ({format_bytes(g.free_bytes)} free of "
                               f"{format_bytes(g.total_bytes)})" for i, g in enumerate(gpus)))
    checks = Checks()
    try:
        check_plain(checks, args, gpus)
        check_pd_refused(checks, args)
    except (RuntimeError, OSError, KeyError, subprocess.TimeoutExpired) as exc:
        checks.check("servers ran", False, str(exc))
    print(f"{'all passed' if not checks.failed else 'FAILED: ' + ', '.join(checks.failed)}")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
