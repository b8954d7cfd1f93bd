"""Build a RAG prompt (instruction, passages, question) whose passages are declared as
reusable chunks.

The prompt's token ids are the concatenation of separately tokenized pieces, so every
passage's tokens are exactly its standalone tokens (a chunk's identity does not depend
on its neighbours) and the spans are exact. `chunk_texts` serve clients that send text
(the OpenAI API), where the server locates the chunks by their token ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from vllm_kvflow.request import PARAMS_KEY

DEFAULT_INSTRUCTION = (
    "Answer the question using the passages. Reply with a short answer only."
)
_SPLIT = "\x00KVFLOW\x00"


@dataclass
class RagPrompt:
    prompt_token_ids: list[int]
    chunk_spans: list[tuple[int, int]]
    question_span: tuple[int, int]
    chunk_texts: list[str]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_transfer_params(self) -> dict[str, Any]:
        body = {"chunk_spans": [i for span in self.chunk_spans for i in span],
                "question": {"span": list(self.question_span)}, **self.settings}
        return {PARAMS_KEY: body}

    def vllm_prompt(self) -> dict[str, Any]:
        """A TokensPrompt dict for LLM.generate."""
        return {"prompt_token_ids": self.prompt_token_ids}


def _chat_frame(tokenizer, instruction: str) -> tuple[str, str]:
    """(text before, text after) the user message in the model's chat template."""
    messages = [{"role": "system", "content": instruction},
                {"role": "user", "content": _SPLIT}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = rendered.split(_SPLIT)
    return before, after


def header_sink_ids(tokenizer, instruction: str = DEFAULT_INSTRUCTION) -> tuple[int, ...]:
    """Token ids of the chat header that build_rag_prompt puts before the first passage:
    as `sink_token_ids`, chunks are computed behind the real system prompt and user-turn
    opening instead of a bare BOS, and the first chunk of every prompt is exact."""
    before, _ = _chat_frame(tokenizer, instruction)
    return tuple(tokenizer.encode(before, add_special_tokens=False))


def passage_text(passage: Any) -> str:
    if isinstance(passage, str):
        return passage
    title, text = passage.get("title", ""), passage["text"]
    return f"{title}\n{text}" if title else text


def build_rag_prompt(tokenizer, question: str, passages: Sequence[Any],
                     instruction: str = DEFAULT_INSTRUCTION, chat: bool = True,
                     **settings: Any) -> RagPrompt:
    """Layout: [chat header][chunk 1]\\n\\n...[chunk n]\\n\\n[Question: ][question][footer],
    a chunk being "title\\ntext". Separators stay outside the chunks: how BPE splits
    whitespace depends on the next word, so a chunk ending in whitespace would not be
    found by its standalone tokens in a prompt tokenized as one text (the server path).

    passages: strings or {"title", "text"} dicts. settings (method, ratio, namespace)
    go into the request's kv_transfer_params.
    """
    if not passages:
        raise ValueError("build_rag_prompt needs at least one passage")

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    before, after = _chat_frame(tokenizer, instruction) if chat else (f"{instruction}\n\n", "\nAnswer:")
    ids = enc(before)
    spans, texts = [], []
    separator = enc("\n\n")
    for passage in passages:
        text = passage_text(passage).strip()
        chunk = enc(text)
        spans.append((len(ids), len(ids) + len(chunk)))
        texts.append(text)
        ids += chunk + separator
    ids += enc("Question: ")
    q = enc(question)
    question_span = (len(ids), len(ids) + len(q))
    ids += q + enc(after)
    return RagPrompt(ids, spans, question_span, texts, dict(settings))
