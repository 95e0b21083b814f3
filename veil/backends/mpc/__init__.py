"""Two-server MPC backend: additive secret sharing over Z_(2^64).

Data flows client -> two non-colluding parties -> client; a dealer that never sees data
supplies correlated randomness. ``fixed``, ``prg``, ``circuit``, ``fss`` and
``protocols`` are the arithmetic and the protocols; ``evaluator`` runs a model on
shares; ``transport`` and ``service`` are the processes and the client library.
"""
