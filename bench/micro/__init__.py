"""Micro-benchmarks, each the cost of one mechanism: the load board and bootstrap table
against SGLang's ways (``board``, ``baselines``), the PD bootstrap path (``pd``), the API
process's CPU per request (``http_stack``), ``pick`` against it (``pick_share``), pooled
connection reuse (``keepalive``) and one rank's model runner (``engine``)."""
