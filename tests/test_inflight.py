"""server.inflight: what the registry says in the log when a request ends badly."""

from __future__ import annotations

import logging

from scheduler.messages import ReqOutput
from server.errors import RequestFailed
from server.inflight import InFlight, RequestHandle


def test_rank_aborts_and_failures_are_logged_route_aborts_are_not(caplog):
    reg = InFlight()
    handles = {rid: RequestHandle(rid, dp_rank=1, prompt_len=4) for rid in "abcd"}
    for h in handles.values():
        reg.add(h)
    with caplog.at_level(logging.WARNING, logger="server.inflight"):
        reg.deliver(1, ReqOutput(rid="a", new_token_ids=[], finish_reason={
            "type": "abort", "message": "no prefill rank placed bootstrap_room 7 in 300 s"}), 1.0)
        reg.fail(handles["b"], "rank 1 lost")
        reg.deliver(1, ReqOutput(rid="c", new_token_ids=[5], finish_reason={
            "type": "length", "length": 1}), 1.0)
        reg.remove(handles["d"])  # the route aborted it (client gone) ...
        reg.deliver(1, ReqOutput(rid="d", new_token_ids=[], finish_reason={
            "type": "abort", "message": "the client disconnected"}), 1.0)  # ... its echo
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["request a aborted on rank 1: no prefill rank placed bootstrap_room 7 in 300 s",
                     "request b on rank 1 failed: rank 1 lost"]
    assert len(reg) == 0
    assert isinstance(handles["b"].queue.get_nowait(), RequestFailed)
    assert handles["d"].queue.empty()
