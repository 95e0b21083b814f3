"""TEE sealed inference: HPKE to an attested enclave key, policy-checked by the client.

- ``attest.py``: EAT-style evidence tokens (JWS, EdDSA), attesters (the INSECURE
  ``software`` one; where SEV-SNP / TDX go), the client's :class:`Policy`.
- ``seal.py``: HPKE suites, the sealed request / response format, the replay window.
- ``bundle.py``: the enclave's model bundle (optionally encrypted at rest, naming its
  runtime), its measurement.
- ``executor.py``: the model runtimes (onnxruntime by default, torch, the interpreter),
  each a kernel table keyed by op (``onnx_kernels.py``, ``torch_kernels.py``).
- ``keyrelease.py``: the model key goes only to an enclave with accepted evidence.
- ``net.py``: length-prefixed messages and typed refusals.
- ``server.py`` (shared), ``enclave.py`` (:class:`Enclave`), ``baseline.py`` (the
  plaintext baseline), ``client.py`` (:class:`TEEClient`); ``service.py`` re-exports them.
"""
from .attest import Policy, SoftwareAttester, TrustedAttester, verify_evidence
from .bundle import export_model, load_model, measure
from .keyrelease import KeyReleaseService
from . import attest, bundle, executor, keyrelease, net, seal  # noqa: F401 (submodules)
from .service import Enclave, PlaintextClient, PlaintextServer, TEEClient

__all__ = ["Enclave", "KeyReleaseService", "PlaintextClient", "PlaintextServer", "Policy",
           "SoftwareAttester", "TEEClient", "TrustedAttester", "export_model", "load_model",
           "measure", "verify_evidence"]
