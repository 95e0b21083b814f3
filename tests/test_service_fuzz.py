"""Property-based fuzzing of the service's OpenAPI spec (schemathesis, in-process app),
and body limits enforced while a request streams."""
import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from veil.deploy import ClientBundle, ModelClient
from veil.service import KeyStore, ServiceConfig, create_app
from veil.wire import pack, unpack

from service_util import tiny_export

OCT = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """Every route: an export with all three modes, a real enclave and real MPC parties
    behind the TEE and MPC routes (their refusals must come back as 4xx)."""
    from veil.backends.mpc import transport
    from veil.backends.tee import SoftwareAttester
    from veil.deploy.export import read_export
    from veil.service.processes import Processes

    root = tmp_path_factory.mktemp("fuzz")
    tiny_export(root / "tiny", "tiny", modes=("he", "tee", "mpc"))
    SoftwareAttester.create(root / "att")
    procs = Processes(root / "logs")
    info = read_export(root / "tiny")
    backends = {"tiny": {"tee": procs.tee(info, attester_key=root / "att"),
                         "mpc": procs.mpc(info, transport.setup(root / "mpc-keys"))}}
    token = KeyStore(root / "store").create("fuzzer", {"rate": 1e6, "burst": 10**6})
    app = create_app(ServiceConfig(exports=[root / "tiny"], store_dir=root / "store",
                                   max_body_bytes={"keys": 32 << 20}, backends=backends))
    client = ModelClient(ClientBundle.load(root / "tiny" / "he" / "client"))
    client.keygen()
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as http:
        r = http.post("/v1/models/tiny/he/sessions", content=client.evaluation_keys(),
                      headers={**auth, **OCT})
        assert r.status_code == 201
        yield {"app": app, "auth": auth, "session": r.json()["session"], "root": root,
               "client": client, "http": http}
    app.state.veil.close()
    procs.close()


def _check(case, service):
    case.call_and_validate(headers=service["auth"], checks=[not_a_server_error])
    params = case.path_parameters or {}
    if params and case.method.upper() != "DELETE":
        # The same body against the real model and session reaches the deserializers.
        params.update({k: v for k, v in (("name", "tiny"), ("session_id", service["session"]))
                       if k in params})
        response = case.call_and_validate(headers=service["auth"],
                                          checks=[not_a_server_error])
        if response.status_code == 201:    # random bytes that make keys: drop the session
            sid = response.json()["session"]
            service["http"].delete(f"/v1/he/sessions/{sid}", headers=service["auth"])


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_a_server_error(service, mode):
    """Every operation of the OpenAPI spec, with a valid API key: never a 5xx."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", service["app"],
                                            headers=service["auth"])
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14        # 8 service and HE, 4 TEE, 2 MPC
    fuzzed = 0
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            _check(case, service)

        try:
            fuzz()
            fuzzed += 1
        except Unsatisfiable:   # nothing to make invalid (e.g. health has no inputs)
            assert mode is GenerationMode.NEGATIVE
    assert fuzzed >= len(operations) - 2


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(target=st.sampled_from(["ciphertext", "keys"]), at=st.floats(0, 1),
       patch=st.binary(min_size=1, max_size=64), cut=st.booleans())
def test_mutated_envelopes_never_make_a_server_error(service, target, at, patch, cut):
    """Valid envelopes (digests recomputed) around mutated OpenFHE bytes: 2xx or 4xx."""
    blob = (service["client"].encrypt(np.zeros(4)) if target == "ciphertext"
            else service["client"].evaluation_keys())
    kind = "veil-ciphertext" if target == "ciphertext" else "veil-evaluation-keys"
    header, parts = unpack(blob, kind)
    name = sorted(parts)[int(at * 7) % len(parts)]
    data = parts[name]
    i = int(at * (len(data) - 1))
    parts[name] = data[:i] if cut else data[:i] + patch + data[i + len(patch):]
    meta = {k: v for k, v in header.items() if k not in ("kind", "parts")}
    path = (f"/v1/he/sessions/{service['session']}/infer" if target == "ciphertext"
            else "/v1/models/tiny/he/sessions")
    r = service["http"].post(path, content=pack(kind, parts, meta),
                             headers={**service["auth"], **OCT})
    assert r.status_code < 500, r.text
    if r.status_code == 201:
        service["http"].delete(f"/v1/he/sessions/{r.json()['session']}",
                               headers=service["auth"])


def test_the_fuzzed_session_still_works(service):
    x = np.array([0.1, -0.2, 0.3, 0.4])
    r = service["http"].post(f"/v1/he/sessions/{service['session']}/infer",
                             content=service["client"].encrypt(x),
                             headers={**service["auth"], **OCT})
    assert r.status_code == 200 and service["client"].decrypt(r.content).shape == (3,)


def test_key_uploads_are_limited_while_streaming(service):
    http, auth = service["http"], service["auth"]
    store = service["root"] / "store"
    before = sorted((store / "sessions").iterdir())

    def chunks(total, size=1 << 20):
        for _ in range(total // size):
            yield bytes(size)

    # No Content-Length (chunked): refused once 32 MiB have arrived, nothing kept.
    r = http.post("/v1/models/tiny/he/sessions", content=chunks(40 << 20),
                  headers={**auth, **OCT})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too-large"
    # A declared length over the limit is refused before the body is read.
    r = http.post("/v1/models/tiny/he/sessions", content=b"x",
                  headers={**auth, **OCT, "Content-Length": str(1 << 40)})
    assert r.status_code == 413
    assert sorted((store / "sessions").iterdir()) == before
    assert list((store / "tmp").iterdir()) == []
