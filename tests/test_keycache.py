"""The rotation-key cache policy (veil.backends.he.keycache), without OpenFHE."""
from __future__ import annotations

from veil.backends.he.keycache import KeyCache


def _cache(capacity):
    log = []
    cache = KeyCache(capacity, lambda k: 1, lambda k: log.append(("load", k)),
                     lambda k: log.append(("drop", k)))
    return cache, log


def _run(cache, layers, images=3):
    cache.schedule(layers)
    for _ in range(images):
        for i, keys in enumerate(layers):
            cache.enter(i)
            for k in sorted(keys):          # one key at a time, as giant steps are
                cache.require([k])
                assert k in cache.loaded()
                assert cache.held <= cache.capacity


def test_farthest_next_use_beats_lru_on_a_cyclic_layer_pattern():
    # five layers sharing 6 keys with a cache of 5: LRU misses every access of a cyclic
    # pattern; the farthest-next-use rule misses about once per layer
    layers = [set(range(6))] * 5
    cache, _ = _cache(5)
    _run(cache, layers)
    lru, _ = _cache(5)
    for _ in range(3):
        for keys in layers:
            for k in sorted(keys):
                lru.require([k])
    assert lru.loads == 90
    assert cache.loads <= 6 + 3 * 5 * 2, cache.loads


def test_keys_of_later_layers_survive_and_unused_keys_go_first():
    layers = [{1, 2}, {3, 4}, {1, 2}]
    cache, log = _cache(3)
    cache.schedule(layers)
    cache.enter(0)
    cache.require([1])
    cache.require([2])
    cache.enter(1)
    cache.require([3])
    # 3 was used in this layer and is next needed in the next inference; 1 and 2
    # in the next layer: 3 goes
    cache.require([4])
    assert cache.loaded() == {1, 2, 4}
    cache.enter(2)
    cache.require([99])     # unknown to the schedule: the first to go
    cache.require([1, 2])
    cache.require([5])
    assert 99 not in cache.loaded() and {1, 2, 5} <= cache.loaded()


def test_keys_needed_together_are_all_loaded_even_over_capacity():
    cache, log = _cache(2)
    cache.require([1, 2, 3, 4])
    assert cache.loaded() == {1, 2, 3, 4} and cache.peak == 4
    cache.require([5])
    assert cache.held <= 2 and 5 in cache.loaded()
    cache.clear()
    assert not cache.loaded() and log.count(("drop", 5)) == 1
