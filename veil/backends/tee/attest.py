"""Attestation evidence: an EAT-style JWT signed by an attester, and the client's policy.

Token form (JWS compact serialization, RFC 7515, with EdDSA / Ed25519, RFC 8037)::

    base64url(header) "." base64url(claims) "." base64url(signature)

    header = {"alg": "EdDSA", "typ": "eat+jwt", "kid": <attester key id>}
    claims = {"eat_profile": PROFILE, "eat_nonce": <client nonce, base64url>,
              "iat": <seconds>, "exp": <seconds>, "measurement": <sha256 hex>,
              "hpke": {<suite>: <enclave public key, base64url>, ...},
              "model": {"input_shape": [...], "output_shape": [...], "max_batch": n},
              "attester": <kind>, "insecure": <bool>, "iss": ..., "veil_version": ...}

The claim names follow the Entity Attestation Token (RFC 9711: ``eat_nonce``,
``eat_profile``) and JWT (RFC 7519: ``iat``, ``exp``, ``iss``).

Attesters. An :class:`Attester` turns claims into a signed token. :class:`SoftwareAttester`
signs with an Ed25519 key in a file: it proves nothing about the hardware, so its key
files, its tokens (``insecure: true``, ``iss``) and every server line that uses it say
INSECURE, and a :class:`Policy` refuses it unless ``allow_insecure`` is set.

Where hardware attesters go. An SEV-SNP attester would put SHA-256 of the canonical
claims into the 64-byte REPORT_DATA of an attestation report (``/dev/sev-guest``
SNP_GET_REPORT) and ship the report and the VCEK certificate chain as the token's
signature part; its verifier checks the chain up to AMD's root key and takes the
measurement from the report's MEASUREMENT field instead of the claims. A TDX attester
does the same with a TD quote (REPORTDATA, MRTD/RTMRs) verified against Intel's PCS
collateral. Both plug in as new ``kind`` values: an :class:`Attester` for the enclave and
a branch in :func:`verify_evidence`; :func:`load_attester` names them today and refuses.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)

from ..._files import write_private
from ...errors import (AttestationError, EvidenceExpiredError, KeyMaterialError,
                       PolicyError)

PROFILE = "urn:veil:tee:evidence:v1"
TOKEN_TYPE = "eat+jwt"
CLOCK_SKEW_S = 5                       # evidence may be this far in the future
MAX_TOKEN = 64 << 10
HARDWARE_KINDS = ("sev-snp", "tdx")
SOFTWARE_KEY = "software-attester.INSECURE.key"
SOFTWARE_PUB = "software-attester.INSECURE.pub.json"
_INSECURE_ISS = "veil software attester (INSECURE: no hardware isolation, development only)"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, TypeError, ValueError):
        raise AttestationError("evidence is not valid base64url") from None


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


# -- tokens -------------------------------------------------------------------------------
def sign_token(claims: dict, key: Ed25519PrivateKey) -> str:
    """JWS compact serialization of ``claims`` signed with EdDSA (Ed25519)."""
    header = {"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": key_id(key.public_key())}
    signing_input = f"{b64(_canonical(header))}.{b64(_canonical(claims))}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"


def _parse(token: str) -> tuple[dict, dict, bytes, bytes]:
    """(header, claims, signing input, signature), unverified."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 2:
        raise AttestationError("evidence is not a JWS compact token")
    head, body, sig = token.split(".")
    try:
        header, claims = json.loads(unb64(head)), json.loads(unb64(body))
    except (ValueError, UnicodeDecodeError):
        raise AttestationError("evidence header or claims are not JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise AttestationError("evidence header or claims are not JSON objects")
    if header.get("alg") != "EdDSA" or header.get("typ") != TOKEN_TYPE:
        raise AttestationError(f"evidence must be an EdDSA {TOKEN_TYPE} token, got "
                               f"alg={header.get('alg')!r} typ={header.get('typ')!r}")
    return header, claims, f"{head}.{body}".encode(), unb64(sig)


# -- attesters ----------------------------------------------------------------------------
class Attester(Protocol):
    """Signs the enclave's claims; ``kind`` names how a verifier checks the signature."""

    kind: str
    insecure: bool

    def attest(self, claims: dict) -> str:
        """The signed token for ``claims`` (which already hold the nonce)."""


class SoftwareAttester:
    """INSECURE development attester: an Ed25519 key in a file, no hardware behind it.

    Anyone who can read the key file can forge evidence for any measurement.
    """

    kind = "software"
    insecure = True

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def create(cls, directory: str | os.PathLike) -> Path:
        """Write a new INSECURE signing key (mode 0600) and its public half."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        write_private(d / SOFTWARE_KEY, key.private_bytes(serialization.Encoding.Raw,
                                                          serialization.PrivateFormat.Raw,
                                                          serialization.NoEncryption()))
        (d / SOFTWARE_PUB).write_text(json.dumps(
            TrustedAttester("software", key.public_key()).to_dict(), indent=1))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SoftwareAttester":
        try:
            raw = (Path(directory) / SOFTWARE_KEY).read_bytes()
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        except (OSError, ValueError) as exc:
            raise KeyMaterialError(f"no software attester key in {directory} (make one "
                                   f"with `veil tee-attester-setup`): {exc}") from None

    def attest(self, claims: dict) -> str:
        claims = dict(claims, attester=self.kind, insecure=True, iss=_INSECURE_ISS)
        return sign_token(claims, self._key)


def load_attester(kind: str, directory: str | os.PathLike) -> Attester:
    """The enclave's attester of ``kind``; hardware kinds are not available here."""
    if kind == "software":
        return SoftwareAttester.load(directory)
    if kind in HARDWARE_KINDS:
        raise AttestationError(f"the {kind} attester needs {kind.upper()} hardware and is "
                               "not implemented yet (see veil/backends/tee/attest.py)")
    raise AttestationError(f"unknown attester kind {kind!r}; one of software, "
                           f"{', '.join(HARDWARE_KINDS)}")


# -- policy -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrustedAttester:
    """An attester's verification key as a policy lists it."""

    kind: str
    public_key: Ed25519PublicKey

    @property
    def kid(self) -> str:
        return key_id(self.public_key)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "public_key": _raw(self.public_key).hex(),
                "kid": self.kid, "insecure": self.kind == "software"}

    @classmethod
    def from_dict(cls, data: dict) -> "TrustedAttester":
        try:
            return cls(str(data["kind"]),
                       Ed25519PublicKey.from_public_bytes(bytes.fromhex(data["public_key"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise PolicyError(f"malformed attester entry in the policy: {exc}") from None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TrustedAttester":
        """The public half written by :meth:`SoftwareAttester.create`."""
        try:
            return cls.from_dict(json.loads((Path(directory) / SOFTWARE_PUB).read_text()))
        except (OSError, ValueError) as exc:
            raise KeyMaterialError(f"no attester public key in {directory}: {exc}") from None


@dataclass(frozen=True)
class Policy:
    """What a client (or the key-release service) accepts.

    Args:
        measurements: the enclave measurements (sha256 hex) that may receive data.
        attesters: the attester keys trusted to sign evidence.
        max_age_s: evidence older than this is refused (and re-fetched by clients).
        allow_insecure: accept the software attester (development only; off by default).
    """

    measurements: frozenset[str]
    attesters: tuple[TrustedAttester, ...]
    max_age_s: float = 300.0
    allow_insecure: bool = False
    kinds: frozenset[str] = field(default=frozenset({"software", *HARDWARE_KINDS}))

    def to_dict(self) -> dict:
        return {"version": 1, "measurements": sorted(self.measurements),
                "attesters": [a.to_dict() for a in self.attesters],
                "max_age_s": self.max_age_s, "allow_insecure": self.allow_insecure,
                "kinds": sorted(self.kinds)}

    @classmethod
    def from_dict(cls, data: dict) -> "Policy":
        try:
            if data.get("version") != 1:
                raise ValueError(f"policy version {data.get('version')!r}; this veil reads 1")
            return cls(frozenset(str(m) for m in data["measurements"]),
                       tuple(TrustedAttester.from_dict(a) for a in data["attesters"]),
                       float(data["max_age_s"]), bool(data["allow_insecure"]),
                       frozenset(str(k) for k in data["kinds"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PolicyError(f"malformed policy: {exc}") from None

    def save(self, path: str | os.PathLike) -> Path:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise PolicyError(f"cannot read the policy {path}: {exc}") from None


@dataclass(frozen=True)
class Evidence:
    """Verified claims of one token."""

    token: str
    claims: dict

    @property
    def measurement(self) -> str:
        return self.claims["measurement"]

    @property
    def nonce(self) -> bytes:
        return unb64(self.claims["eat_nonce"])

    @property
    def issued_at(self) -> float:
        return float(self.claims["iat"])

    @property
    def expires_at(self) -> float:
        return float(self.claims["exp"])

    @property
    def insecure(self) -> bool:
        return bool(self.claims.get("insecure", True))

    def public_key(self, suite: str) -> bytes:
        try:
            return unb64(self.claims["hpke"][suite])
        except (KeyError, TypeError):
            raise AttestationError(f"the evidence has no HPKE key for suite {suite!r}") from None


def verify_evidence(token: str, policy: Policy, nonce: bytes,
                    now: float | None = None) -> Evidence:
    """Check ``token`` against ``policy`` for the ``nonce`` this verifier sent.

    1. Parse the JWS and find the signing key among the policy's trusted attesters.
    2. Verify the Ed25519 signature over the header and claims.
    3. Check the profile, the attester kind (and the insecure opt-in), the nonce,
       the freshness (``iat`` within ``max_age_s``, not past ``exp``), the measurement.

    Raises:
        AttestationError: malformed token, bad signature, or a different nonce.
        PolicyError: an untrusted attester or kind, insecure without opt-in, or an
            unknown measurement.
        EvidenceExpiredError: too old, expired, or issued in the future.
    """
    header, claims, signing_input, signature = _parse(token)
    trusted = {a.kid: a for a in policy.attesters}
    attester = trusted.get(header.get("kid"))
    if attester is None:
        raise PolicyError(f"the evidence is signed by attester key {header.get('kid')!r}, "
                          "which the policy does not trust")
    try:
        attester.public_key.verify(signature, signing_input)
    except InvalidSignature:
        raise AttestationError("the evidence signature does not verify") from None
    if claims.get("eat_profile") != PROFILE:
        raise AttestationError(f"unknown evidence profile {claims.get('eat_profile')!r}")
    kind = claims.get("attester")
    if kind != attester.kind or kind not in policy.kinds:
        raise PolicyError(f"attester kind {kind!r} is not allowed by the policy")
    if (claims.get("insecure") or kind == "software") and not policy.allow_insecure:
        raise PolicyError("the evidence comes from the INSECURE software attester; set "
                          "allow_insecure in the policy for development only")
    if claims.get("eat_nonce") != b64(nonce):
        raise AttestationError("the evidence does not answer this nonce (stale or "
                               "replayed evidence)")
    now = time.time() if now is None else now
    try:
        iat, exp = float(claims["iat"]), float(claims["exp"])
    except (KeyError, TypeError, ValueError):
        raise AttestationError("the evidence has no valid iat/exp") from None
    if iat > now + CLOCK_SKEW_S:
        raise EvidenceExpiredError("the evidence is issued in the future; check the clocks")
    if now - iat > policy.max_age_s or now >= exp:
        raise EvidenceExpiredError(f"the evidence is {now - iat:.0f} s old (policy allows "
                                   f"{policy.max_age_s:.0f} s, expiry {exp - iat:.0f} s)")
    if claims.get("measurement") not in policy.measurements:
        raise PolicyError(f"unknown measurement {claims.get('measurement')!r}: not in the "
                          "policy's allowed list")
    return Evidence(token, claims)
