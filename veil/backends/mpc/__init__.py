"""Two-server MPC backend (in progress): additive secret sharing over Z_(2^64).

Data flows client -> two non-colluding parties -> client; a dealer that never sees data
supplies correlated randomness. This package holds the arithmetic, the dealer's
material and the party-side protocols; processes and transport come next.
"""
