"""Child process of test_store_restart.py: a fresh engine with a disk tier in argv[1]
answers one RAG request and prints its tokens and kvflow stats as one JSON line.

A separate process per run is the point: nothing but the disk directory is shared."""
import json
import sys

PASSAGES = [
    {"title": "Lake Orvena", "text": "Lake Orvena lies in the northern valley of Teskar. Its water "
     "is cold all year, and the town of Mirel on its shore is known for blue glass."},
    {"title": "Mirel glass", "text": "Glassmakers in Mirel color their glass with copper ash from "
     "the hills. The craft began in the year 812 under the guild of Anse Valo."},
]
QUESTION = "Who founded the glass guild of Mirel?"
MARK = "KVFLOW_RESULT "


def main(disk_dir: str) -> None:
    from vllm import LLM, SamplingParams

    import vllm_kvflow
    from vllm_kvflow.model import default_model_path
    from vllm_kvflow.rag import build_rag_prompt
    from vllm_kvflow.request import STATS_KEY

    # As tests/engine/conftest.py, plus enforce_eager: no graph compile at each start.
    llm = LLM(str(default_model_path()), dtype="float32", kv_cache_memory_bytes=256 << 20,
              max_model_len=1024, enable_prefix_caching=False, enforce_eager=True,
              distributed_executor_backend="uni", seed=0,
              kv_transfer_config=vllm_kvflow.transfer_config(
                  method="none", log_stats=False, store_disk_path=disk_dir, store_disk_gb=0.1))
    rp = build_rag_prompt(llm.get_tokenizer(), QUESTION, PASSAGES)
    sp = SamplingParams(temperature=0.0, max_tokens=8,
                        extra_args={"kv_transfer_params": rp.kv_transfer_params})
    out = llm.generate([rp.vllm_prompt()], sp, use_tqdm=False)[0]
    stats = out.kv_transfer_params[STATS_KEY]
    print(MARK + json.dumps({"token_ids": list(out.outputs[0].token_ids),
                             "text": out.outputs[0].text, "stats": stats}), flush=True)
    # Exit normally: the disk tier's atexit hook writes what is still queued.


if __name__ == "__main__":
    main(sys.argv[1])
