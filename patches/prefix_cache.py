"""Keep approximate KV out of vLLM's exact prefix cache.

vLLM caches every full block a request computes under a hash of the token prefix, so a
blended request's blocks (reused chunk KV, partly recomputed) would later be served to
an identical prompt as if they were exact. The block hashes chain from the first block,
whose hash includes `request.cache_salt`: re-salting a blended request and recomputing
its hashes moves its blocks into their own hash space. The salt names the method, the
ratio, the declared spans and a digest of the prompt up to the question's end, because a
blend of the context depends on the question that follows it: only the same context and
question blended the same way share blocks (a longer prompt with the same head may).

The blend salt is a digest of those fields and the client's own salt, each
length-prefixed, so no client salt or namespace can spell another tenant's blend. The
client's salt is kept on the request when the blend salt replaces it (tenant_salt reads
it back), never parsed out of a string the client chose.

Exact blocks the request already hit (looked up before the connector runs) stay valid.
Both vLLM versions compute hashes through `Request._block_hasher` into `block_hashes`
(bytes digests, each chaining its prefix): the salted hashes are derived from them.
"""
from __future__ import annotations

import hashlib

from vllm_kvflow.store.entry import hash_fields, int64_bytes

MARKER = "kvflow-blend:"
# Where isolate_blended_blocks keeps the client's own cache salt on a vLLM Request.
CLIENT_SALT_ATTR = "kvflow_client_salt"


def blend_salt(prompt_token_ids, spec, tenant_salt: str | None) -> str:
    """Salt naming how `spec` (a RequestSpec) blends this prompt's context, for the
    tenant whose own salt is tenant_salt (None or empty: no salt, as in vLLM)."""
    h = hashlib.blake2b(digest_size=16)
    hash_fields(h, tenant_salt or None, spec.method, repr(float(spec.ratio)),
                repr((list(spec.chunks), tuple(spec.question))),
                int64_bytes(list(prompt_token_ids[:spec.question[1]])))
    return f"{MARKER}{h.hexdigest()}"


def isolate_blended_blocks(request, salt: str) -> bool:
    """Re-salt `request` so the blocks it computes hash apart from exact ones.

    Idempotent (the scheduler may ask about a request again after a failed allocation).
    Returns False where the request does not hash blocks (prefix caching off).
    """
    if request.cache_salt == salt:
        return True
    hasher = getattr(request, "_block_hasher", None)
    if hasher is None:
        return False
    if not hasattr(request, CLIENT_SALT_ATTR):
        setattr(request, CLIENT_SALT_ATTR, request.cache_salt)
    request.cache_salt = salt
    hashes = request.block_hashes
    if hashes and all(isinstance(h, bytes) for h in hashes):
        # Derive each salted hash from the exact one (which already chains the whole
        # prefix): one small blake2b per block instead of rehashing every block's
        # tokens, ~3x cheaper at 32K tokens. Blocks hashed later chain from these.
        key = hashlib.blake2b(salt.encode(), digest_size=16).digest()
        hashes[:] = [type(h)(hashlib.blake2b(key + h, digest_size=len(h)).digest()) for h in hashes]
    else:
        hashes.clear()
        hashes.extend(hasher(request))
    return True


def tenant_salt(request) -> str | None:
    """The client's own cache salt (None or empty: none), also after
    isolate_blended_blocks replaced the request's salt with a blend salt."""
    salt = getattr(request, CLIENT_SALT_ATTR, getattr(request, "cache_salt", None))
    return salt or None
