"""Blended requests hash their blocks apart from exact ones (engine proof: test_server)."""
from types import SimpleNamespace

from vllm_kvflow.patches.prefix_cache import blend_salt, isolate_blended_blocks, tenant_salt
from vllm_kvflow.request import RequestSpec


def _spec(method="infoflow", ratio=0.15, question=(8, 10)):
    return RequestSpec([(2, 5), (5, 8)], question, method, ratio, "default")


def _request(salt=None):
    req = SimpleNamespace(cache_salt=salt, block_hashes=["exact0", "exact1"], calls=0)

    def hasher(r):
        r.calls += 1
        return [f"{r.cache_salt}/0", f"{r.cache_salt}/1"]
    req._block_hasher = hasher
    return req


def test_salt_depends_on_method_ratio_spans_and_head_not_tail():
    ids = list(range(12))
    base = blend_salt(ids, _spec(), None)
    assert base == blend_salt(ids + [99, 98], _spec(), None)  # tokens after the question
    assert base != blend_salt(ids, _spec(method="none"), None)
    assert base != blend_salt(ids, _spec(ratio=0.3), None)
    assert base != blend_salt(ids, _spec(question=(8, 11)), None)
    assert base != blend_salt([7] + ids[1:], _spec(), None)
    assert base != blend_salt(ids, _spec(), "tenant-a")
    assert base == blend_salt(ids, _spec(), "")  # an empty salt is no salt, as in vLLM


def test_isolation_rehashes_once_and_keeps_the_tenant_salt():
    req = _request("tenant-a")
    salt = blend_salt(list(range(12)), _spec(), tenant_salt(req))
    assert isolate_blended_blocks(req, salt)
    assert req.block_hashes == [f"{salt}/0", f"{salt}/1"] and req.calls == 1
    assert isolate_blended_blocks(req, salt) and req.calls == 1  # idempotent on retry
    assert tenant_salt(req) == "tenant-a" and tenant_salt(_request()) is None
    assert tenant_salt(_request("")) is None
    assert not isolate_blended_blocks(SimpleNamespace(cache_salt=None, block_hashes=[]), salt)


def test_byte_hashes_are_derived_not_recomputed():
    """vLLM's hashes are bytes digests that chain the prefix: the salted ones are derived
    from them (no token rehash), differ per salt, and blocks hashed later chain on."""
    exact = [bytes([i]) * 32 for i in range(3)]

    def request():
        req = SimpleNamespace(cache_salt=None, block_hashes=list(exact), calls=0)

        def hasher(r):
            r.calls += 1
            return []
        req._block_hasher = hasher
        return req

    a, b, c = request(), request(), request()
    assert isolate_blended_blocks(a, "s1") and isolate_blended_blocks(b, "s1")
    assert isolate_blended_blocks(c, "s2")
    assert a.calls == b.calls == c.calls == 0
    assert a.block_hashes == b.block_hashes  # the same blend shares blocks
    assert len(set(a.block_hashes) | set(c.block_hashes) | set(exact)) == 9
    assert all(isinstance(h, bytes) and len(h) == 32 for h in a.block_hashes)
    assert a.cache_salt == "s1"


def test_the_client_salt_is_kept_not_parsed_out_of_the_blend_salt():
    """Salts shaped like the blend salt or like the old `<salt>|kvflow:` tag come back
    exactly as the client sent them, before and after the request is re-salted."""
    ids = list(range(12))
    for client in ("tenant-a|kvflow:x", "|kvflow:", "kvflow-blend:", blend_salt(ids, _spec(), "t"),
                   "a|salt=b", "東京\ud800"):
        req = _request(client)
        assert tenant_salt(req) == client
        salt = blend_salt(ids, _spec(), tenant_salt(req))
        assert isolate_blended_blocks(req, salt) and req.cache_salt == salt != client
        assert tenant_salt(req) == client
        assert isolate_blended_blocks(req, blend_salt(ids, _spec(), tenant_salt(req)))
        assert req.calls == 1 and tenant_salt(req) == client  # asked again: unchanged
