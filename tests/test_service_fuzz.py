"""Fuzzing a REAL `veil serve` process: schemathesis over its OpenAPI spec (URL loader,
the service a subprocess, so a native crash fails a test instead of killing pytest), and
mutated TEE and MPC bodies that get past the first checks.

- Every operation, positive and negative generation, three ways: with the client's own
  key (the real model name and session substituted too, so bodies reach the
  deserializers), with no key (401 for everything but health), and with another
  client's key on this client's session paths (404, like an unknown session).
- A real sealed request (attested channel, right channel id) with a few bytes mutated.
- A real MPC request whose party-0 share is mutated after party 1 got its own share.
- Real ciphertexts and evaluation keys mutated in the first 2 KB of their OpenFHE parts
  (digests recomputed): a hypothesis sample of what test_service_abuse sweeps.

Never a 5xx, and the service answers its health check after every operation and at the
end. Examples are bounded (derandomized) so the module fits CI in about two minutes.
"""
from __future__ import annotations

import socket
import time

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from abuse_util import (CT_KIND, GENEROUS, KEYS_KIND, OCT, RSSWatch, Served, create_key,
                        json_error, repack, serve_args, three_mode_export)
from veil.wire import unpack

EXAMPLES = 12


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    """`veil serve` of an export with he, tee and mpc; alice has an HE session, an
    attested TEE channel and MPC links; bob is another client."""
    import veil
    from veil.deploy import ClientBundle, ModelClient

    root = tmp_path_factory.mktemp("fuzz")
    info = three_mode_export(root)
    store = root / "store"
    tokens = {who: create_key(store, who, *GENEROUS) for who in ("alice", "bob")}
    served = Served([root / "lin"], store, "--tee-attester-key", root / "att", "--mpc-keys",
                    root / "mpc-keys", *serve_args())
    he = ModelClient(ClientBundle.load(root / "lin" / "he" / "client"))
    he.keygen()
    auth = {"Authorization": f"Bearer {tokens['alice']}"}
    r = httpx.post(f"{served.url}/v1/models/lin/he/sessions", content=he.evaluation_keys(),
                   headers={**auth, **OCT}, timeout=60)
    assert r.status_code == 201, r.text
    tee = veil.Client(served.url, "lin", "tee", api_key=tokens["alice"],
                      key_dir=root / "k-alice", policy=root / "policy.json")
    mpc = veil.Client(served.url, "lin", "mpc", api_key=tokens["alice"],
                      key_dir=root / "k-alice", mpc_keys=root / "mpc-keys")
    tee.predict(np.zeros(4))
    mpc.predict(np.zeros(4))
    # a mutated length can make an unprotected service allocate 16 GB: it is killed
    # past +1.5 GB instead (and then fails the tests), this machine is shared
    with RSSWatch(served):
        yield {"root": root, "served": served, "tokens": tokens,
               "session": r.json()["session"], "he": he, "keys": he.evaluation_keys(),
               "tee": tee, "mpc": mpc}
    tee.close()
    mpc.close()
    served.stop()
    # the service stopped normally (SIGTERM), it did not die earlier
    assert served.proc.returncode in (0, -15), served.proc.returncode


def _bearer(env, who):
    return {"Authorization": f"Bearer {env['tokens'][who]}"} if who else {}


def _schema(env):
    return schemathesis.openapi.from_url(f"{env['served'].url}/openapi.json",
                                         headers=_bearer(env, "alice"), timeout=30)


def _own(env, case, response):
    """Alice's key: never a 5xx (on random and on her real model and session)."""
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
    params = case.path_parameters or {}
    if params and case.method.upper() != "DELETE":
        params.update({k: v for k, v in (("name", "lin"), ("session_id", env["session"]))
                       if k in params})
        again = case.call(base_url=env["served"].url, headers=_bearer(env, "alice"),
                          timeout=60)
        assert again.status_code < 500, (case.method, case.formatted_path, again.text[:300])
        if again.status_code == 201:       # random bytes that make keys: drop the session
            httpx.delete(f"{env['served'].url}/v1/he/sessions/{again.json()['session']}",
                         headers=_bearer(env, "alice"))


def _anonymous(env, case, response):
    """No key: 401 everywhere but health (404/405 for paths that route nowhere)."""
    if case.path == "/v1/health":
        assert response.status_code == 200
    else:
        assert response.status_code in (401, 404, 405), (case.method, case.formatted_path,
                                                          response.status_code)


def _foreign(env, case, response):
    """Bob on alice's session: exactly what an unknown session gets (404)."""
    params = case.path_parameters or {}
    assert response.status_code < 500, (case.method, case.formatted_path)
    if "session_id" in params:
        # the generated body on alice's session with bob's key (built here: a negative
        # case may carry a mutated Authorization header of its own)
        path = case.path.replace("{session_id}", env["session"])
        body = case.body if isinstance(case.body, (bytes, str)) else b"\0" * 64
        r = httpx.request(case.method, env["served"].url + path, content=body,
                          headers={**_bearer(env, "bob"), **OCT}, timeout=60)
        assert r.status_code == 404, (case.method, path, r.status_code)
        assert json_error(r) == "not-found"


@pytest.mark.parametrize("who,check", [("alice", _own), (None, _anonymous), ("bob", _foreign)],
                         ids=["own-key", "no-key", "foreign-key"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_a_server_error(fuzz_env, mode, who, check):
    """Every operation of the OpenAPI spec: never a 5xx, the service alive after each."""
    served = fuzz_env["served"]
    schema = _schema(fuzz_env)
    operations = [result.ok() for result in schema.get_all_operations()]
    # 1. the spec has every route: 8 service and HE, 4 TEE, 2 MPC
    assert len(operations) >= 14
    fuzzed = 0
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call(base_url=served.url, headers=_bearer(fuzz_env, who),
                                 timeout=60)
            check(fuzz_env, case, response)

        try:
            fuzz()
            fuzzed += 1
        except Unsatisfiable:   # nothing to make invalid (e.g. health has no inputs)
            assert mode is GenerationMode.NEGATIVE
        # 2. the service is up after each operation's examples
        assert served.alive(), f"veil serve died on {op.label}: {served.exit_reason()}"
    # 3. (almost) every operation was fuzzed
    assert fuzzed >= len(operations) - 2


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(at=st.floats(0, 1), patch=st.binary(min_size=1, max_size=4))
def test_mutated_sealed_requests_never_make_a_server_error(fuzz_env, at, patch):
    """A real sealed request on alice's attested channel, a few bytes after the channel
    id changed: the enclave refuses it (4xx), nobody crashes."""
    request = fuzz_env["tee"].encrypt(np.full((1, 4), 0.5))
    message = bytearray(request.message)
    i = 16 + int(at * (len(message) - 17))
    for k, b in enumerate(patch):
        if i + k < len(message):
            message[i + k] ^= b or 0xFF
    r = httpx.post(f"{fuzz_env['served'].url}/v1/models/lin/tee/infer", content=bytes(message),
                   headers={**_bearer(fuzz_env, "alice"), **OCT}, timeout=60)
    # 1. a JSON 4xx (a changed sealed byte never authenticates)
    assert 400 <= r.status_code < 500 and json_error(r), (r.status_code, r.text[:200])
    # 2. the service is up
    assert fuzz_env["served"].alive(), fuzz_env["served"].exit_reason()


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(at=st.floats(0, 1), patch=st.binary(min_size=1, max_size=4))
def test_mutated_mpc_shares_never_make_a_server_error(fuzz_env, at, patch):
    """A real MPC request by the SDK: party 1 gets its real share, party 0's (the body
    the SDK posts to the service) has a few bytes changed (framing, request id or
    share values)."""
    from veil.errors import VeilError

    env = fuzz_env
    client = env["mpc"]
    original = client._call
    answers = []

    def call(method, path, **kw):
        if not path.endswith("/mpc/share"):
            return original(method, path, **kw)
        body = bytearray(kw["content"])
        i = int(at * (len(body) - 1))
        for k, b in enumerate(patch):
            if i + k < len(body):
                body[i + k] ^= b or 0xFF
        kw["content"] = bytes(body)
        try:
            out = original(method, path, **kw)
            answers.append((200, "ok"))
            return out
        except VeilError as exc:
            answers.append((getattr(exc, "status", None), getattr(exc, "code", None)))
            raise

    client._call = call
    try:
        client.predict(np.full(4, 0.5))
    except VeilError:       # refused (expected for most mutations): checked below
        pass
    finally:
        del client._call
    # 1. the share reached the service, which answered 200 (changed share values are
    #    still shares) or a JSON 4xx (a typed error with its code)
    assert len(answers) == 1, answers
    status, code = answers[0]
    assert status == 200 or (isinstance(status, int) and 400 <= status < 500 and code), \
        answers
    # 2. the service is up
    assert env["served"].alive(), env["served"].exit_reason()


def test_the_fuzzed_service_still_serves_every_mode(fuzz_env):
    """After all of the above, alice's real requests in every mode still work."""
    env = fuzz_env
    url, auth = env["served"].url, _bearer(env, "alice")
    x = np.array([0.1, -0.2, 0.3, 0.4])
    r = httpx.post(f"{url}/v1/he/sessions/{env['session']}/infer",
                   content=env["he"].encrypt(x), headers={**auth, **OCT}, timeout=60)
    # 1. HE on the fuzzed session
    assert r.status_code == 200 and env["he"].decrypt(r.content).shape == (2,)
    # 2. TEE and MPC agree with each other (both exact to 1e-4 on this linear model)
    t0 = time.monotonic()
    tee, mpc = env["tee"].predict(x), env["mpc"].predict(x)
    np.testing.assert_allclose(tee, mpc, atol=1e-3)
    # 3. and answer promptly (no request table left full of orphans)
    assert time.monotonic() - t0 < 15.0
    # 4. the service's health says ok
    assert httpx.get(f"{url}/v1/health", timeout=30).json()["status"] == "ok"


def test_key_uploads_are_limited_before_the_body(fuzz_env):
    """A declared length over the limit is refused before the body is read; nothing kept."""
    env = fuzz_env
    store = env["served"].store
    before = sorted(p.name for p in (store / "sessions").iterdir())
    host, port = env["served"].url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall((f"POST /v1/models/lin/he/sessions HTTP/1.1\r\nHost: {host}\r\n"
                   f"Authorization: Bearer {env['tokens']['alice']}\r\nContent-Type: "
                   f"application/octet-stream\r\nContent-Length: {1 << 40}\r\n\r\nx").encode())
        head = s.recv(4096).split(b"\r\n")[0]
    # 1. 413 straight away
    assert head.split()[1] == b"413", head
    # 2. nothing was kept
    assert sorted(p.name for p in (store / "sessions").iterdir()) == before


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(target=st.sampled_from(["ct", "mult", "rotations"]), at=st.integers(0, 2047),
       patch=st.binary(min_size=1, max_size=8), cut=st.booleans())
def test_mutated_openfhe_bytes_never_make_a_server_error(fuzz_env, target, at, patch, cut):
    """Valid envelopes (digests recomputed) around OpenFHE parts mutated in their first
    2 KB, where the headers and lengths are (runs last: it may kill a broken service)."""
    env = fuzz_env
    served = env["served"]
    assert served.alive(), f"veil serve is down: {served.exit_reason()}"
    if target == "ct":
        blob, kind = env["he"].encrypt(np.zeros(4)), CT_KIND
        path = f"/v1/he/sessions/{env['session']}/infer"
    else:
        blob, kind, path = env["keys"], KEYS_KIND, "/v1/models/lin/he/sessions"
    data = unpack(blob, kind)[1][target]
    data = data[:at] if cut else data[:at] + patch + data[at + len(patch):]
    try:
        r = httpx.post(served.url + path, content=repack(blob, kind, target, data),
                       headers={**_bearer(env, "alice"), **OCT}, timeout=60)
    except httpx.HTTPError as exc:
        r = exc
    # 1. the service is up
    assert served.alive(), f"veil serve died: {served.exit_reason()}"
    # 2. a 2xx or a JSON 4xx
    assert isinstance(r, httpx.Response) and (r.status_code in (200, 201) or (
        400 <= r.status_code < 500 and json_error(r))), r
    if r.status_code == 201:
        httpx.delete(f"{served.url}/v1/he/sessions/{r.json()['session']}",
                     headers=_bearer(env, "alice"))
