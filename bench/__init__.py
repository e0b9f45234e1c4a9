"""Benchmarks that print figures (``docs/results.md`` has them with their commands).

- ``bench.client``: the load generator (``python -m bench.client.serving``, SGLang's
  ``bench_serving`` layout) and the handle on a server under test;
- ``bench.compare``: balancing methods side by side on named scenarios
  (``python -m bench.compare``), pooled over seeds, across rank counts, on a burst trace;
- ``bench.micro``: one mechanism's cost (the board, the bootstrap path, the HTTP stack,
  ``pick`` against the front door, connection reuse, the model runner);
- ``bench.models``: process-free models (the lockstep queueing model, the simulated
  accelerator's fit to the real model);
- ``bench.cuda_check``: the checks that need CUDA.
"""
