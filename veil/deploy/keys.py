"""Key material as distinct types with distinct serializers.

:class:`EvaluationKeys` is all a server ever receives. :class:`SecretKey` never leaves
the client unless the client calls :meth:`SecretKey.save` itself; a server refuses it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .._files import write_private
from ..errors import KeyTypeError, SerializationError
from ..wire import pack, part_size, peek_kind, unpack, write

EVAL_KEYS_KIND = "veil-evaluation-keys"
PUBLIC_KEY_KIND = "veil-public-key"
WEIGHTS_KIND = "veil-encrypted-weights"
SECRET_KEY_KIND = "veil-secret-key"
CIPHERTEXT_KIND = "veil-ciphertext"
# OpenFHE key tags are 128 random bits as lowercase hex; anything else in a header is
# refused before it reaches a log line, a file name or OpenFHE's key maps.
_KEY_TAG = re.compile(r"[0-9a-f]{32}")
# A key file the server maps from its own disk (ResNet-20's: 17.3 GB); envelopes held
# in memory keep wire's 16 GiB bound.
MAX_KEY_FILE = 1 << 36


@dataclass(frozen=True)
class EvaluationKeys:
    """Relinearization and rotation keys of one client, for one model's parameters."""

    model_id: str
    tag: str
    parts: dict
    insecure_test_params: bool = False

    def _meta(self) -> dict:
        return {"model": self.model_id, "tag": self.tag,
                "insecure": self.insecure_test_params}

    def to_bytes(self) -> bytes:
        return pack(EVAL_KEYS_KIND, self.parts, self._meta())

    def save(self, path: str | os.PathLike) -> int:
        """Write :meth:`to_bytes`'s envelope to a new private file (mode 0600) part by
        part, without joining several GiB in memory; returns its size."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            return write(f, EVAL_KEYS_KIND, self.parts, self._meta())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvaluationKeys":
        """Open a key file without reading it into memory: the parts are views of the
        mapped file (checked like :meth:`from_bytes`)."""
        import mmap

        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise SerializationError("the evaluation key file is empty")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return cls.from_bytes(memoryview(mapped), copy=False, max_size=MAX_KEY_FILE)

    @classmethod
    def from_bytes(cls, blob: bytes, *, copy: bool = True,
                   max_size: int = 1 << 34) -> "EvaluationKeys":
        if isinstance(blob, SecretKey) or peek_kind(blob) == SECRET_KEY_KIND:
            raise KeyTypeError("a secret key was offered where evaluation keys belong; "
                               "servers never accept secret keys")
        header, parts = unpack(blob, EVAL_KEYS_KIND, copy=copy, max_size=max_size)
        if not _key_parts(set(parts)) or not isinstance(header.get("tag"), str):
            raise SerializationError("evaluation keys are missing parts")
        if not _KEY_TAG.fullmatch(header["tag"]):
            raise SerializationError("evaluation keys carry a malformed key tag (OpenFHE "
                                     "tags are 32 lowercase hex characters)")
        return cls(str(header.get("model")), header["tag"], parts,
                   bool(header.get("insecure", False)))

    @property
    def size(self) -> int:
        return sum(part_size(p) for p in self.parts.values())


_ROTATION_PART = re.compile(r"rotation/-?[0-9]{1,9}")


def _key_parts(names: set[str]) -> bool:
    """The two part layouts of evaluation keys: one rotation key map (``mult``,
    ``rotations``), or for a bootstrapped model the bootstrapping keys and one part per
    rotation key (``mult``, ``bootstrap``, ``rotation/<k>``: loaded one by one); which
    rotations must be there is the validator's check."""
    if names == {"mult", "rotations"}:
        return True
    return {"mult", "bootstrap"} <= names and all(
        _ROTATION_PART.fullmatch(n) for n in names - {"mult", "bootstrap"})


@dataclass(frozen=True, repr=False)
class SecretKey:
    """The client's secret key (with its public key). Its repr never shows key bytes."""

    model_id: str
    secret: bytes
    public: bytes

    def __repr__(self) -> str:
        return f"SecretKey(model_id={self.model_id!r}, <redacted>)"

    def to_bytes(self) -> bytes:
        return pack(SECRET_KEY_KIND, {"secret": self.secret, "public": self.public},
                    {"model": self.model_id})

    @classmethod
    def from_bytes(cls, blob: bytes) -> "SecretKey":
        header, parts = unpack(blob, SECRET_KEY_KIND)
        if set(parts) != {"secret", "public"}:
            raise SerializationError("secret key file is missing parts")
        return cls(str(header.get("model")), parts["secret"], parts["public"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the key to ``path`` with permissions 0600 (owner read/write only)."""
        write_private(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SecretKey":
        return cls.from_bytes(Path(path).read_bytes())


@dataclass(frozen=True)
class PublicKey:
    """A client's public encryption key: lets a model owner encrypt weights for it."""

    model_id: str
    tag: str
    key: bytes

    def to_bytes(self) -> bytes:
        return pack(PUBLIC_KEY_KIND, {"key": self.key}, {"model": self.model_id,
                                                         "tag": self.tag})

    @classmethod
    def from_bytes(cls, blob: bytes) -> "PublicKey":
        if isinstance(blob, PublicKey):
            return blob
        header, parts = unpack(blob, PUBLIC_KEY_KIND)
        if set(parts) != {"key"} or not isinstance(header.get("tag"), str):
            raise SerializationError("public key is missing parts")
        return cls(str(header.get("model")), header["tag"], parts["key"])
