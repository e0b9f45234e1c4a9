"""The front door's invariant (``EngineClient._submit``) by fault injection: after the
board bump, an exception raised at any step (building or encoding the rank message,
the handle, its registration, the pipe send, the PD route insert, the decode half of
a PD request), ``Exception`` or ``BaseException``, leaves every board's effective
load and the PD route table at zero, and the server serves the next request.

Two simulated ranks behind ``TestClient`` (a plain server), and a PD front door (one
prefill and one decode rank, ``PDProcesses``) in-process.
"""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

import server.engine_client as engine_client_module
from engine.sampling import SamplingParams
from server.app import create_app
from server.engine_client import EngineClient
from server.pd import PDProcesses
from server.prepared import PreparedRequest
from server.ranks import EngineProcesses
from server.request_flow import new_rid
from tests.test_server_app import make_args

BODY = {"text": "hello", "sampling_params": {"max_new_tokens": 2}}


class Injected(Exception):
    pass


class InjectedBase(BaseException):
    """Not an Exception: what a KeyboardInterrupt or a cancellation looks like."""


def _app(engine):
    return TestClient(create_app(engine), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    args = make_args(tmp_path_factory.mktemp("front"), step_s=0.001)
    procs = EngineProcesses(args).start()
    try:
        procs.wait_ready(60)
        engine = EngineClient.from_processes(args, procs)
        with _app(engine) as client:
            yield engine, client
    finally:
        procs.close()


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    args = make_args(tmp_path_factory.mktemp("front_pd"), step_s=0.001,
                     disaggregation_mode="pd", prefill_dp_size=1, decode_dp_size=1)
    procs = PDProcesses(args)
    try:
        procs.start()
        procs.wait_ready(60)
        engine = procs.engine_client()
        with _app(engine) as client:
            yield engine, client
    finally:
        procs.close()


def _raiser(kind: type[BaseException], hits: list):
    def boom(*args, **kwargs):
        hits.append(1)
        raise kind("injected")
    return boom


def _clients(engine) -> list[EngineClient]:
    return [engine.prefill, engine.decode] if hasattr(engine, "prefill") else [engine]


def _pipes(engine):
    return [p for c in _clients(engine) for p in c._pipes.values()]


# name -> (what to patch, given the engine): (object, attribute) pairs
PLAIN_FAULTS = {
    "GenerateReq": lambda e: [(engine_client_module, "GenerateReq")],
    "encode": lambda e: [(engine_client_module, "encode")],
    "RequestHandle": lambda e: [(engine_client_module, "RequestHandle")],
    "inflight.add": lambda e: [(c.inflight, "add") for c in _clients(e)],
    "pipe send": lambda e: [(p, "send") for p in _pipes(e)],
}
PD_FAULTS = {
    **PLAIN_FAULTS,
    "route insert": lambda e: [(e.prefill.router.route, "insert")],
    "decode inflight.add": lambda e: [(e.decode.inflight, "add")],
    "decode pipe send": lambda e: [(p, "send") for p in e.decode._pipes.values()],
}


def assert_nothing_left(engine) -> None:
    """Effective loads (reported + dispatched - acked) zero on every board, no request
    registered, no route (bounded wait: a PD prefill half that reached its rank before
    the decode half failed is aborted there, and its rank acks it)."""
    deadline = time.monotonic() + 5
    while True:
        loads = [(int(s.effective_reqs.sum()), int(s.effective_tokens.sum()))
                 for s in (g.board.snapshot() for g in engine.rank_groups())]
        rooms = engine.prefill.router.num_rooms if hasattr(engine, "prefill") else 0
        registered = sum(len(c.inflight) for c in _clients(engine))
        if (all(load == (0, 0) for load in loads) and rooms == 0 and registered == 0) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert loads == [(0, 0)] * len(loads) and rooms == 0 and registered == 0, (loads, rooms,
                                                                               registered)


def _submit_in_loop(engine, client) -> BaseException | None:
    """``engine.submit`` on the app's event loop (where it always runs); what it raised.
    Called directly: a BaseException must not reach (and stop) the test client."""
    async def attempt():
        try:
            engine.submit(PreparedRequest(new_rid(), [5, 6, 7], SamplingParams(max_new_tokens=2)))
        except BaseException as exc:
            return exc
        return None
    return client.portal.call(attempt)


def _inject(engine, client, monkeypatch, targets, kind) -> None:
    hits: list = []
    with monkeypatch.context() as m:
        for obj, attr in targets(engine):
            m.setattr(obj, attr, _raiser(kind, hits))
        raised = _submit_in_loop(engine, client)
        assert isinstance(raised, kind), raised
        if kind is Injected:  # and through a route: a 500, nothing left either
            assert client.post("/generate", json=BODY).status_code == 500
    assert hits, "the fault was never reached"
    assert_nothing_left(engine)
    r = client.post("/generate", json=BODY)
    assert r.status_code == 200, r.text
    assert_nothing_left(engine)


@pytest.mark.parametrize("kind", [Injected, InjectedBase])
@pytest.mark.parametrize("fault", sorted(PLAIN_FAULTS))
def test_plain_fault_after_the_bump_leaves_nothing(plain, monkeypatch, fault, kind):
    engine, client = plain
    _inject(engine, client, monkeypatch, PLAIN_FAULTS[fault], kind)


@pytest.mark.parametrize("kind", [Injected, InjectedBase])
@pytest.mark.parametrize("fault", sorted(PD_FAULTS))
def test_pd_fault_after_the_bump_leaves_nothing(pd, monkeypatch, fault, kind):
    engine, client = pd
    _inject(engine, client, monkeypatch, PD_FAULTS[fault], kind)
