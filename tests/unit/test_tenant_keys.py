"""Tenant identity is a collision-free encoding of its fields: adversarial namespaces and
cache salts (separators of every format this project ever used, the length-prefix
syntax itself, empty strings, NUL, non-ASCII, lone surrogates) never give two different
(namespace, salt) pairs the same chunk key, glue key or blend salt.

A property test over a generated universe: every string of up to two adversarial atoms,
plus strings that spell out other pairs' encodings, as namespace and as salt."""
from __future__ import annotations

import itertools

from vllm_kvflow.patches.prefix_cache import blend_salt
from vllm_kvflow.request import RequestSpec
from vllm_kvflow.store.entry import chunk_key, hash_fields, tenant_namespace

ATOMS = ["", "a", "acme", "tenant-a", "|", "|salt=", "salt=", "|kvflow:", "kvflow:",
         "kvflow-blend:", ":", "0:", "1:", "1:a", "2:", "10:", "9", "\0", "\0\0", "é", "東京",
         "\U0001F600", "\ud800", "S", "B", "N"]


def _strings() -> list[str]:
    pairs = {a + b for a, b in itertools.product(ATOMS, repeat=2)}
    # Strings that spell out the encoding of other pairs, and the old "|salt=" format.
    spelled = {tenant_namespace(n, s) for n in ("", "a", "1:a") for s in (None, "a", "1:a")}
    spelled |= {f"{n}|salt={s}" for n in ("", "acme") for s in ("tenant-a", "|salt=")}
    return sorted(pairs | spelled)


STRINGS = _strings()
SALTS = [None] + STRINGS


def _normalized(salt: str | None) -> str | None:
    return salt or None  # an empty salt is no salt, as in vLLM's prefix cache


def test_the_universe_is_adversarial_enough():
    assert len(STRINGS) > 500
    for needed in ("acme|salt=tenant-a", "tenant-a|kvflow:", "|kvflow:|salt=", "1:a1:a", ""):
        assert needed in STRINGS


def test_tenant_namespaces_of_different_pairs_differ():
    seen: dict[str, tuple] = {}
    for ns, salt in itertools.product(STRINGS, SALTS):
        pair = (ns, _normalized(salt))
        encoded = tenant_namespace(ns, salt)
        assert seen.setdefault(encoded, pair) == pair, (encoded, seen[encoded], pair)
    assert len(seen) == len(STRINGS) * len(STRINGS)  # every distinct pair: its own name


def test_chunk_keys_of_different_tenants_differ_for_the_same_tokens():
    # The namespaces are distinct strings already; the key must keep them apart, also
    # from a namespace that spells the bytes of the fields after it.
    keys: dict[str, tuple] = {}
    sink, tokens = [1], [5, 6, 7]
    for ns, salt in itertools.product(STRINGS[::3], SALTS[::3]):
        pair = (ns, _normalized(salt))
        key = chunk_key("model", tenant_namespace(ns, salt), sink, tokens)
        assert keys.setdefault(key, pair) == pair


def test_chunk_key_fields_cannot_absorb_each_other():
    """Length-prefixed fields: moving bytes from one field into the next never gives the
    same key (the old NUL-separated key did, for a namespace holding NUL)."""
    cases = [("m", "a\0", [1], [2]), ("m\0a", "", [1], [2]), ("m", "a", [1], [2]),
             ("m", "", [1, 2], []), ("m", "", [1], [2]), ("m", "", [], [1, 2]),
             ("", "m", [1], [2]), ("m", "\0" + "\x01" * 8, [], [2])]
    keys = {chunk_key(*case) for case in cases}
    assert len(keys) == len(cases)


def test_hash_fields_tags_absent_text_and_bytes_apart():
    import hashlib

    def digest(*fields):
        h = hashlib.sha256()
        hash_fields(h, *fields)
        return h.hexdigest()

    variants = [(None,), ("",), (b"",), ("N",), (b"N",), (None, None), ("", ""), ("a", "b"),
                ("ab",), ("a", "", "b"), (b"a", "b"), ("\ud800",), ("\udfff",), ()]
    assert len({digest(*v) for v in variants}) == len(variants)


def _spec():
    return RequestSpec([(2, 5), (5, 8)], (8, 10), "infoflow", 0.15, "default")


def test_blend_salts_of_different_tenant_salts_differ():
    ids = list(range(12))
    seen: dict[str, str | None] = {}
    for salt in SALTS:
        out = blend_salt(ids, _spec(), salt)
        assert seen.setdefault(out, _normalized(salt)) == _normalized(salt)
        assert len(out) < 128  # vLLM's limit on a client's cache_salt
    # A salt that carries another tenant's salt as its head, then the old separator.
    assert blend_salt(ids, _spec(), "tenant-a|kvflow:x") != blend_salt(ids, _spec(), "tenant-a")


def test_a_namespace_or_salt_spelling_another_tenants_pair_names_another_tenant():
    victim = tenant_namespace("acme", "tenant-a")
    assert tenant_namespace("acme|salt=tenant-a", None) != victim  # namespace spells the salt
    assert tenant_namespace("acme", "tenant-a|kvflow:x") != victim  # salt carries the old tag
