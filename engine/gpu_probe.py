"""``python -m engine.gpu_probe``: each visible GPU's free and total memory, as JSON.

The API process must not import torch (it starts fast and stays small), yet it places
ranks on GPUs and sizes their KV pools before spawning them; it runs this module in a
subprocess (``server.memory.probe_gpus``). Torch sees the GPUs as the ranks will
(``CUDA_VISIBLE_DEVICES`` applied; none with a CPU-only torch). The free memory is read
with this process's CUDA context on each device, as a rank's is once it starts; the
contexts end with the process.

Output: ``[{"free": bytes, "total": bytes, "name": str}, ...]`` in CUDA index order.
"""

from __future__ import annotations

import json

import torch


def gpu_memory() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append({"free": free, "total": total, "name": torch.cuda.get_device_name(index)})
    return gpus


if __name__ == "__main__":
    print(json.dumps(gpu_memory()))
