"""Per-request chunk declarations: parsing, validation and locating chunks in the prompt.

A request declares its chunks in `kv_transfer_params["kvflow"]`:

    {"chunks": [{"span": [start, end]} | {"text": "..."} | {"token_ids": [...]}
                | {"image": i}, ...],                    # i: the request's i-th image
     or "chunk_spans": [start0, end0, start1, end1, ...],  # the compact form of spans
     "question": {"span": [s, e]} | {"text": "..."},     # optional, for scoring
     "method": "infoflow", "ratio": 0.15, "namespace": "tenant-a"}   # optional

Spans index the prompt's token ids, end exclusive. `chunk_spans` says the same as a
list of span chunks, in one flat list of integers: vLLM deep-copies every request's
sampling parameters, which took 2.2 ms for 316 span objects and 0.5 ms for the flat
list (SamplingParams.clone on the CPU machine). Texts and token ids are located in
the prompt, in declaration order. Bad declarations raise RequestError, which the
connector turns into a full-prefill fallback with the reason in the stats; a chunk that
cannot be located is listed in `unlocatable` and its tokens are prefilled normally.
Image chunks (the `image` form, the `image_chunks` setting) follow the rules in
vision/image_declaration.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from vllm_kvflow.config import METHODS, KVFlowConfig, check_ratio

PARAMS_KEY = "kvflow"
STATS_KEY = "kvflow_stats"
_KEYS = {"chunks", "chunk_spans", "question", "method", "ratio", "namespace"}
_CHUNK_FORMS = ("span", "text", "token_ids", "image")

# The deepest a valid declaration nests: the kvflow object > `chunks` > a chunk object >
# its span. Deeper values are malformed, and one nested hundreds deep breaks vLLM's
# transport itself (RecursionError while pickling kills the engine core).
MAX_NESTING = 4
# The chunks of a 128K-token prompt take ~0.5 MB declared by text and ~1 MB by token ids;
# a larger value is not a chunk declaration, only memory and serialization work for the
# engine core, which every other request waits on.
MAX_DECLARATION_BYTES = 8 << 20
_SCALAR_BYTES = 8  # what a number, bool, null or container head counts toward the size
_SCALARS = {int, float, bool, type(None)}


class RequestError(ValueError):
    """A malformed chunk declaration; the message is reported to the client."""


@dataclass
class RequestSpec:
    """A validated declaration, chunks located as sorted non-overlapping spans."""

    chunks: list[tuple[int, int]]
    question: tuple[int, int]
    method: str
    ratio: float
    namespace: str
    unlocatable: list[int] = field(default_factory=list)
    too_short: list[int] = field(default_factory=list)  # located, shorter than min_chunk_tokens
    images: dict[int, int] = field(default_factory=dict)  # image chunks: start -> image index

    @property
    def context_end(self) -> int:
        return self.chunks[-1][1]

    @property
    def num_chunk_tokens(self) -> int:
        return sum(e - s for s, e in self.chunks)


def check_transportable(value: Any, root: str = PARAMS_KEY) -> None:
    """Raise RequestError unless value nests at most MAX_NESTING containers deep, takes at
    most about MAX_DECLARATION_BYTES encoded, and holds only strings that encode to UTF-8
    (JSON can carry lone surrogates such as "\\ud800"; msgpack cannot). Iterative: a
    hostile value may nest far deeper than Python's recursion limit."""
    size = 0
    # (value, its nesting depth, the path of its container, its key there): the path is
    # only spelled out for an error, not for each of a long list's token ids.
    stack: list[tuple[Any, int, str, Any]] = [(value, 1, "", None)]
    while stack:
        item, depth, parent, key = stack.pop()
        if isinstance(item, str):
            size += _utf8_size(item, parent, key, root)
        elif isinstance(item, (dict, list, tuple)):
            where = _path(parent, key)
            if depth > MAX_NESTING:
                raise RequestError(f"{root}{where}: nested more than {MAX_NESTING} levels "
                                   "deep (no valid declaration nests deeper)")
            size += _SCALAR_BYTES
            if not isinstance(item, dict) and set(map(type, item)) <= _SCALARS:
                pairs = ()  # token ids, spans: counted without a loop over each
                size += _SCALAR_BYTES * len(item)
            else:
                pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for k, sub in pairs:
                if isinstance(k, str):
                    size += _utf8_size(k, where, None, root, is_key=True)
                if isinstance(sub, (str, dict, list, tuple)):
                    stack.append((sub, depth + 1, where, k))
                else:
                    size += _SCALAR_BYTES
        else:
            size += _SCALAR_BYTES
        if size > MAX_DECLARATION_BYTES:
            raise RequestError(f"{root}: larger than {MAX_DECLARATION_BYTES >> 20} MiB "
                               "encoded (a chunk declaration is about the size of its prompt)")


def _path(parent: str, key: Any) -> str:
    if key is None:
        return parent
    return f"{parent}[{key}]" if isinstance(key, int) else f"{parent}.{ascii(key)[1:-1]}"


def _utf8_size(text: str, parent: str, key: Any, root: str, is_key: bool = False) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        where = f"{parent} (a key)" if is_key else _path(parent, key)
        raise RequestError(f"{root}{where}: not valid Unicode text (lone surrogate "
                           f"{ascii(text[e.start])} at index {e.start})") from None


def find_subsequence(haystack: Sequence[int], needle: Sequence[int], start: int = 0) -> int:
    """First index >= start where needle occurs in haystack, or -1."""
    n = len(needle)
    if n == 0:
        return -1
    first = needle[0]
    limit = len(haystack) - n
    i = start
    while i <= limit:
        try:
            i = haystack.index(first, i, limit + 1)
        except ValueError:
            return -1
        if haystack[i:i + n] == needle:
            return i
        i += 1
    return -1


def _span(value: Any, prompt_len: int, what: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)):
        raise RequestError(f"{what}: span must be [start, end] integers, got {value!r}")
    start, end = value
    if not 0 <= start < end <= prompt_len:
        raise RequestError(f"{what}: span {value} outside the prompt of {prompt_len} tokens "
                           "(need 0 <= start < end <= prompt length)")
    return start, end


def _token_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"{what}: token_ids must be a list of integers")
    if not value:
        raise RequestError(f"{what}: empty chunk")
    return value


def _text_tokens(value: Any, tokenize: Callable[[str], list[int]] | None, what: str) -> list[int]:
    if not isinstance(value, str):
        raise RequestError(f"{what}: text must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RequestError(f"{what}: empty chunk text")
    if tokenize is None:
        raise RequestError(f"{what}: chunk texts need the tokenizer, which is unavailable")
    # Edge whitespace tokenizes differently next to other text; the stripped text does not.
    return tokenize(value.strip())


def _texts_to_locate(declared: list, question: Any) -> list[str]:
    """The chunk texts, then the question text, stripped as _text_tokens tokenizes them;
    malformed ones are skipped here and reported by the checks that follow."""
    items = declared + ([question] if isinstance(question, dict) else [])
    return [item["text"].strip() for item in items
            if isinstance(item, dict) and isinstance(item.get("text"), str) and item["text"].strip()]


def _declared_chunks(params: dict, optional: bool = False) -> list:
    """The chunk declarations, from `chunks` or from the flat `chunk_spans` (one of them;
    neither, if optional: the images are chunks by the `image_chunks` setting)."""
    if optional and "chunks" not in params and "chunk_spans" not in params:
        return []
    if "chunks" in params and "chunk_spans" in params:
        raise RequestError("give chunks or chunk_spans, not both")
    if "chunk_spans" in params:
        flat = params["chunk_spans"]
        if not isinstance(flat, list) or not flat or len(flat) % 2:
            raise RequestError("chunk_spans must be a non-empty flat list "
                               "[start0, end0, start1, end1, ...]")
        return [flat[i:i + 2] for i in range(0, len(flat), 2)]  # span chunks, checked below
    declared = params.get("chunks")
    if not isinstance(declared, list) or not declared:
        raise RequestError("chunks must be a non-empty list (or chunk_spans a flat list "
                           "[start0, end0, start1, end1, ...])")
    return declared


def parse_request(params: Any, prompt_ids: Sequence[int], config: KVFlowConfig,
                  tokenize: Callable[[str], list[int]] | None = None,
                  images: Sequence[Any] | None = None,
                  tokenize_ahead: Callable[[list[str]], None] | None = None) -> RequestSpec:
    """Validate `params` (the value under PARAMS_KEY) against the prompt's token ids.
    images: the request's images as vision.image_declaration.ImageInput, in order (None:
    the model takes no images). tokenize_ahead(texts): called once, after the
    declaration's size is checked, with every text about to be tokenized, so that a
    cache behind `tokenize` can fill itself in one batched call."""
    check_transportable(params)
    if not isinstance(params, dict):
        raise RequestError(f"kv_transfer_params[{PARAMS_KEY!r}] must be an object")
    unknown = sorted(set(params) - _KEYS)
    if unknown:
        raise RequestError(f"unknown keys {unknown}; known: {sorted(_KEYS)}")
    method = params.get("method", config.method)
    if method not in METHODS:
        raise RequestError(f"method must be one of {list(METHODS)}, got {method!r}")
    try:
        ratio = check_ratio(params.get("ratio", config.recompute_ratio))
    except ValueError as e:
        raise RequestError(str(e)) from None
    namespace = params.get("namespace", config.namespace)
    if not isinstance(namespace, str):
        raise RequestError("namespace must be a string")

    prompt = list(prompt_ids)
    declared = _declared_chunks(params, optional=bool(images) and config.image_chunks == "all")
    if len(declared) > config.max_chunks:
        raise RequestError(f"{len(declared)} chunks declared, more than max_chunks="
                           f"{config.max_chunks} (an engine setting)")
    if tokenize_ahead is not None:
        tokenize_ahead(_texts_to_locate(declared, params.get("question")))
    spans: list[tuple[int, int, int]] = []  # (start, end, declaration index)
    unlocatable: list[int] = []
    image_of: dict[int, int] = {}  # image chunks: start -> image index
    cursor = 0
    for i, item in enumerate(declared):
        what = f"chunk {i}"
        if isinstance(item, (list, tuple)):
            item = {"span": item}
        if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in _CHUNK_FORMS:
            raise RequestError(f"{what}: must be one of {{'span': [s, e]}}, {{'text': str}}, "
                               f"{{'token_ids': [...]}}, {{'image': i}}; got {item!r}")
        (form, value), = item.items()
        if form == "image":
            from vllm_kvflow.vision.image_declaration import declared_image_span

            s, e, n = declared_image_span(value, images, len(prompt), set(image_of.values()), what)
            spans.append((s, e, i))
            image_of[s] = n
            continue
        if form == "span":
            spans.append((*_span(value, len(prompt), what), i))
            continue
        needle = (_token_list(value, what) if form == "token_ids"
                  else _text_tokens(value, tokenize, what))
        at = find_subsequence(prompt, needle, cursor)
        if at < 0:
            unlocatable.append(i)
            continue
        spans.append((at, at + len(needle), i))
        cursor = at + len(needle)

    if images is not None:
        from vllm_kvflow.vision.image_declaration import complete_image_chunks

        spans = complete_image_chunks(spans, image_of, images, len(prompt),
                                      config.min_chunk_tokens, config.image_chunks)
    spans.sort()
    for (s0, e0, _), (s1, e1, _) in zip(spans, spans[1:]):
        if s1 < e0:
            raise RequestError(f"chunks overlap: [{s0}, {e0}) and [{s1}, {e1})")
    if not spans:
        raise RequestError(f"no chunk could be located in the prompt (unlocatable: {unlocatable})")
    # vLLM must compute at least the last prompt token itself to produce logits.
    s, e, i = spans[-1]
    spans[-1] = (s, min(e, len(prompt) - 1), i)
    shortest = config.min_chunk_tokens
    too_short = sorted(i for s, e, i in spans if e - s < shortest and s not in image_of)
    chunks = [(s, e) for s, e, _ in spans if e - s >= shortest or s in image_of]
    if not chunks:
        raise RequestError(f"no chunk of at least min_chunk_tokens={shortest} tokens (an "
                           "engine setting) before the prompt's last token (too short: "
                           f"{too_short}, unlocatable: {unlocatable})")
    ctx_end = chunks[-1][1]

    question = (ctx_end, len(prompt))
    if "question" in params:
        q = params["question"]
        if isinstance(q, dict) and set(q) == {"span"}:
            question = _span(q["span"], len(prompt), "question")
        elif isinstance(q, dict) and set(q) == {"text"}:
            needle = _text_tokens(q["text"], tokenize, "question")
            at = find_subsequence(prompt, needle, ctx_end)
            if at < 0:
                raise RequestError("question text not found after the chunks")
            question = (at, at + len(needle))
        else:
            raise RequestError("question must be {'span': [s, e]} or {'text': str}")
        if question[0] < ctx_end:
            raise RequestError("question must come after the last chunk")
    return RequestSpec(chunks, question, method, ratio, namespace, unlocatable, too_short,
                       image_of)
