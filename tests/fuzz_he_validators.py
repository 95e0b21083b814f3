"""Coverage-guided fuzz target (atheris / libFuzzer) for the OpenFHE payload validators.

Run: ``python tests/fuzz_he_validators.py -runs=N`` or ``-max_total_time=S`` (any
libFuzzer flag). ``tests/test_he_validate.py`` runs it briefly; ``bench/
fuzz_validators.py`` runs it longer and writes a report.

Setup makes real payloads once with OpenFHE (insecure toy parameters): a ciphertext in
each honest layout, the relinearization key and the rotation key map. Each fuzz input is
a mutation program applied to one of them (byte writes at offsets biased towards the
structure, u64 overwrites with boundary values, truncation and extension) or, rarely,
raw bytes. The property: the validator either raises a veil error, or the bytes it
accepted are structurally the template: the same length, every byte outside the
coefficient holes and tags equal to the honest payload, the tags equal, and every
coefficient word below its tower's modulus (checked here in plain Python, independently
of the validator's numpy code). OpenFHE itself is never called on fuzzed bytes.
"""
import atexit
import json
import struct
import sys
from collections import Counter

import atheris
import numpy as np

# Only the validators are instrumented for coverage (veil's other imports, torch
# among them, are loaded by the same import but left alone).
with atheris.instrument_imports(include=["veil.backends.he.validate", "veil.errors"]):
    from veil.backends.he import validate  # noqa: F401
    from veil.errors import VeilError

from veil.backends.he.openfhe_engine import (ClientCrypto, WeightEncryptor,  # noqa: E402
                                             payload_validator)
from veil.compiler.plan import CKKSParams  # noqa: E402

TOY = CKKSParams(1 << 11, 1, 40, 60, 2, "HEStd_NotSet", True)
ROTS = [1, -1]
BOUNDARY = [0, 1, TOY.ring_dim, TOY.ring_dim + 1, 1 << 31, 1 << 32, 1 << 40, (1 << 63),
            (1 << 64) - 1]


def _setup():
    validator = payload_validator(TOY, ROTS)
    with ClientCrypto(TOY) as client:
        parts = client.keygen(ROTS)
        tag = client.tag
        zeros = np.zeros(TOY.slots)
        payloads = [("ct", client.encrypt(zeros), validator.ciphertexts[0]),
                    ("ct", WeightEncryptor(TOY, client.public_key_bytes()).encrypt(zeros),
                     validator.ciphertexts[1]),
                    ("mult", parts["mult"], validator.mult),
                    ("rotations", parts["rotations"], validator.rotations)]
    kinds = []
    for kind, blob, checker in payloads:
        checker.check(blob, tag)              # the honest payload passes
        holes = [(o, m) for o, m in zip(checker.hole_offsets.tolist(),
                                        checker.hole_moduli.tolist())]
        struct_offsets = [o for o, seg in checker.segments for o in range(o, o + len(seg))]
        kinds.append((kind, blob, checker, holes, struct_offsets))
    return validator, parts, tag, kinds


VALIDATOR, PARTS, TAG, KINDS = _setup()
VERDICTS: Counter = Counter()



def _report() -> None:
    print("verdicts: " + json.dumps(dict(VERDICTS)), file=sys.stderr, flush=True)


atexit.register(_report)        # libFuzzer may leave with _exit: also every 5000 runs


def _check(kind: str, data: bytes) -> None:
    if kind == "ct":
        VALIDATOR.check_ciphertext(data, TAG)
    elif kind == "mult":
        VALIDATOR.check_eval_keys({"mult": data, "rotations": PARTS["rotations"]}, TAG)
    else:
        VALIDATOR.check_eval_keys({"mult": PARTS["mult"], "rotations": data}, TAG)


def _structurally_template(blob: bytes, checker, holes, data: bytes) -> bool:
    if len(data) != len(blob):
        return False
    for off, seg in checker.segments:
        if data[off:off + len(seg)] != seg:
            return False
    for off in checker.tag_offsets:
        if data[off:off + checker.tag_length] != TAG.encode():
            return False
    n = checker.ring_dim
    for off, mod in holes:
        if data[off - 8:off] != struct.pack("<Q", n):     # framing is structure too
            return False
        if max(struct.unpack_from(f"<{n}Q", data, off)) >= mod:
            return False
    return True


def test_one_input(raw: bytes) -> None:
    if sum(VERDICTS.values()) % 5000 == 4999:
        _report()
    fdp = atheris.FuzzedDataProvider(raw)
    kind, blob, checker, holes, struct_offsets = KINDS[fdp.ConsumeIntInRange(0, 3)]
    # An exhausted provider returns the minimum: 0 must mean "mutate", not "raw".
    mode = fdp.ConsumeIntInRange(0, 15)
    if mode == 15:                              # raw bytes as the whole payload
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    else:
        out = bytearray(blob)
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            op = fdp.ConsumeIntInRange(0, 5)
            if op <= 1 and struct_offsets:      # a structure byte
                pos = struct_offsets[fdp.ConsumeIntInRange(0, len(struct_offsets) - 1)]
                if pos < len(out):
                    out[pos] = fdp.ConsumeInt(1) & 0xFF
            elif op == 2 and out:               # any byte
                out[fdp.ConsumeIntInRange(0, len(out) - 1)] = fdp.ConsumeInt(1) & 0xFF
            elif op == 3:                       # a u64 boundary value, near structure
                base = struct_offsets[fdp.ConsumeIntInRange(0, len(struct_offsets) - 1)]
                pos = base - fdp.ConsumeIntInRange(0, 7)
                value = BOUNDARY[fdp.ConsumeIntInRange(0, len(BOUNDARY) - 1)]
                if 0 <= pos <= len(out) - 8:
                    out[pos:pos + 8] = struct.pack("<Q", value)
            elif op == 4:                       # a coefficient word
                off, mod = holes[fdp.ConsumeIntInRange(0, len(holes) - 1)]
                pos = off + 8 * fdp.ConsumeIntInRange(0, checker.ring_dim - 1)
                delta = fdp.ConsumeIntInRange(0, 3)
                value = [mod - 1, mod, mod + 1, fdp.ConsumeInt(8) & ((1 << 64) - 1)][delta]
                if pos <= len(out) - 8:
                    out[pos:pos + 8] = struct.pack("<Q", value)
            else:                               # truncate or extend
                if fdp.ConsumeBool():
                    del out[fdp.ConsumeIntInRange(0, len(out)):]
                else:
                    out += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
        data = bytes(out)
    try:
        _check(kind, data)
    except VeilError as exc:
        VERDICTS[type(exc).__name__] += 1
        return
    VERDICTS["accepted"] += 1
    if not _structurally_template(blob, checker, holes, data):
        raise AssertionError(f"the {kind} validator accepted bytes that are not "
                             "structurally its template")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
