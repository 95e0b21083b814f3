"""The plumbing under every error: each veil error has an HTTP answer that the SDK
turns back into the same class, the service's connection pool never hides the error
that failed a request, and a model's id is hashed once."""
from __future__ import annotations

import inspect
import time
from dataclasses import replace

import numpy as np
import pytest

import veil.errors as errors_module
from veil.errors import (InputError, MpcError, MpcRefusedError, NotFoundError, SessionExpiredError,
                         TransportError, UnavailableError, VeilError)
from veil.service.errors import (ERRORS, WIRE_ALIASES, exception_for, public_message,
                                 spec_for)
from veil.service.pool import ConnectionPool

ERROR_CLASSES = [cls for _, cls in inspect.getmembers(errors_module, inspect.isclass)
                 if issubclass(cls, VeilError) and cls.__module__ == errors_module.__name__]


def test_the_walk_finds_the_whole_hierarchy():
    names = {cls.__name__ for cls in ERROR_CLASSES}
    assert len(ERROR_CLASSES) >= 40
    assert {"VeilError", "MpcError", "TransportError", "ProcessError", "TicketError",
            "InputRangeError", "ModelTooLargeError", "SessionExpiredError"} <= names


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_has_its_own_row_and_comes_back_as_itself(cls):
    rows = [row for row in ERRORS if row.exc is cls]
    assert len(rows) == 1, f"{cls.__name__} needs exactly one row in veil.service.errors"
    row = rows[0]
    assert spec_for(cls("m")) is row
    assert 400 <= row.status < 600 and row.code
    back = exception_for(row.code, "the message", row.status)
    assert type(back) is WIRE_ALIASES.get(cls, cls)
    assert isinstance(back, VeilError) and str(back) == "the message"
    assert back.status == row.status and back.code == row.code


def test_codes_are_shared_only_by_the_declared_aliases():
    by_code: dict[str, list[type]] = {}
    for row in ERRORS:
        by_code.setdefault(row.code, []).append(row.exc)
    shared = {cls for classes in by_code.values() if len(classes) > 1 for cls in classes[1:]}
    assert shared == set(WIRE_ALIASES)
    assert all(issubclass(cls, base) for cls, base in WIRE_ALIASES.items())
    assert type(exception_for("not-found", "m")) is NotFoundError
    assert spec_for(SessionExpiredError("m")).status == 404


def test_backend_failures_are_the_services_never_a_refusal():
    """A dealer's or peer's failure used to answer 400 'refused' (no row for MpcError):
    the client could not tell its fault from the service's."""
    from veil.backends.mpc.wire import _Unreachable
    from veil.deploy.processes import ProcessError
    assert spec_for(MpcError("party0 sent message kind 9")).status == 502
    assert spec_for(MpcRefusedError("party0: the other share never came")).status == 400
    assert spec_for(_Unreachable("dealer", "gone")).code == "mpc"
    assert spec_for(TransportError("link failed")).status == 502
    assert spec_for(ProcessError("x")).status == 503
    assert public_message(TransportError("10.0.0.7:9 refused")) == \
        "a link between the service's processes failed"
    assert public_message(MpcError("party0: the share never came")) == \
        "party0: the share never came"


class Conn:
    def __init__(self, close_error: Exception | None = None) -> None:
        self.closed, self.close_error = False, close_error

    def close(self) -> None:
        self.closed = True
        if self.close_error is not None:
            raise self.close_error


def test_a_connect_that_fails_unexpectedly_surfaces_its_own_error():
    def connect():
        raise RuntimeError("the handshake code has a bug")
    pool = ConnectionPool("party 0", connect)
    with pytest.raises(RuntimeError, match="the handshake code has a bug") as info:
        pool.call(lambda conn: conn)
    assert info.value.__context__ is None           # nothing else went wrong on the way


def test_a_connect_that_fails_on_the_network_is_unavailable():
    def connect():
        raise ConnectionRefusedError("refused")
    with pytest.raises(UnavailableError, match="party 0 is unreachable: refused"):
        ConnectionPool("party 0", connect).call(lambda conn: conn)


def test_a_failing_close_never_replaces_the_error_of_the_request():
    conn = Conn(close_error=OSError("close failed too"))

    def exchange(c):
        raise InputError("the request's own error")
    with pytest.raises(InputError, match="the request's own error"):
        ConnectionPool("enclave", lambda: conn).call(exchange)
    assert conn.closed
    conn = Conn(close_error=OSError("close failed too"))

    def broken(c):
        raise TransportError("link failed")
    with pytest.raises(UnavailableError, match="enclave is unreachable: link failed"):
        ConnectionPool("enclave", lambda: conn).call(broken)
    assert conn.closed


def test_model_id_is_hashed_once_and_follows_the_input_range(monkeypatch):
    import torch
    from torch import nn

    import veil
    from veil import model as model_module
    torch.manual_seed(0)
    compiled = veil.compile(nn.Sequential(nn.Linear(4, 3)), np.random.rand(16, 4))
    calls = []
    real = model_module.fingerprint
    monkeypatch.setattr(model_module, "fingerprint",
                        lambda m: calls.append(1) or real(m))
    first = compiled.model_id
    assert [compiled.model_id for _ in range(5)] == [first] * 5 and len(calls) == 1
    wider = compiled.input_range
    compiled.input_range = replace(wider, lo=wider.lo - 1, hi=wider.hi + 1)
    assert compiled.model_id != first and len(calls) == 2


def test_bundle_model_id_is_hashed_once(tmp_path, monkeypatch):
    import torch
    from torch import nn

    import veil
    from veil.deploy import bundle as bundle_module
    torch.manual_seed(0)
    compiled = veil.compile(nn.Sequential(nn.Linear(4, 3)), np.random.rand(16, 4),
                            insecure_test_params=True)
    _, client_dir = compiled.export(tmp_path)
    client = bundle_module.ClientBundle.load(client_dir)
    calls = []
    real = bundle_module.fingerprint
    monkeypatch.setattr(bundle_module, "fingerprint", lambda m: calls.append(1) or real(m))
    start = time.perf_counter()
    ids = {client.model_id for _ in range(100)}
    assert ids == {compiled.model_id} and len(calls) == 1
    assert time.perf_counter() - start < 0.05
