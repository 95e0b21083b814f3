"""Runs the client and server roles on exported bundles in a fresh process.

A separate process so that peak memory is the encrypted pipeline's own, not the
training framework's. Usage: he_worker.py CLIENT_DIR SERVER_DIR INPUTS.npy OUT.json
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM).

    Not getrusage's ru_maxrss: Linux carries that across exec, so a worker forked from a
    large parent would report the parent's size.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _single(client, session, xs) -> dict:
    enc, ev, dec, outs = [], [], [], []
    ct_in = ct_out = 0
    for x in xs:
        a = time.perf_counter()
        ct = client.encrypt(x)
        b = time.perf_counter()
        res = session.run(ct)
        c = time.perf_counter()
        outs.append(client.decrypt(res).tolist())
        d = time.perf_counter()
        enc.append(b - a), ev.append(c - b), dec.append(d - c)
        ct_in, ct_out = len(ct), len(res)
    return {"encrypt_s": enc, "eval_s": ev, "decrypt_s": dec, "outputs": outs,
            "ct_in_bytes": ct_in, "ct_out_bytes": ct_out}


def _batch(client, session, xs, layout: str = "auto") -> dict:
    a = time.perf_counter()
    cts = client.encrypt_batch(xs, layout=layout)
    b = time.perf_counter()
    res = session.run_batch(cts)
    c = time.perf_counter()
    outs = client.decrypt_batch(res)
    d = time.perf_counter()
    return {"ciphertexts": len(cts), "encrypt_s": b - a, "eval_s": c - b,
            "decrypt_s": d - c, "outputs": outs.tolist(), "ct_in_bytes": len(cts[0]),
            "ct_out_bytes": len(res[0]), "layout": client.batch_layout(len(xs))
            if layout == "auto" else layout}


def main(client_dir: str, server_dir: str, inputs_path: str, out_path: str,
         how: str = "single", owner_dir: str = "") -> None:
    """``how``: "single" (one input per ciphertext, timed each), "batch" (the layout
    ``encrypt_batch`` picks), "features" (one ciphertext per feature) or "lanes".

    With ``owner_dir`` (the model owner's plaintext server bundle), the server bundle is
    an encrypted-weight one and the owner encrypts the weights for this client.
    """
    from veil import ModelClient, ModelServer
    from veil.deploy import ServerBundle, encrypt_weights

    xs = np.load(inputs_path, allow_pickle=False)
    client, server = ModelClient(client_dir), ModelServer(server_dir)
    t0 = time.perf_counter()
    client.keygen()
    keys = client.evaluation_keys()
    t1 = time.perf_counter()
    weights = (encrypt_weights(ServerBundle.load(owner_dir), client.public_key())
               if owner_dir else None)
    tw = time.perf_counter()
    session = server.open_session(keys, weights=weights)
    t2 = time.perf_counter()
    if how == "single":
        result = _single(client, session, xs)
    else:
        result = _batch(client, session, xs, how if how in ("features", "lanes") else "auto")
    session.close()
    result.update(keygen_s=t1 - t0, session_s=t2 - tw, eval_key_bytes=len(keys),
                  weight_encrypt_s=tw - t1, weight_bytes=len(weights or b""),
                  lanes=client.lanes, peak_rss_bytes=peak_rss_bytes())
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(*sys.argv[1:7])
