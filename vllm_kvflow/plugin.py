"""The `vllm.general_plugins` entry point. vLLM calls it in every process (API server,
engine core, each worker), possibly more than once: everything here is idempotent."""
from __future__ import annotations

CONNECTOR_NAME = "KVFlowConnector"
CONNECTOR_MODULE = "vllm_kvflow.connector.connector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)

    from vllm_kvflow.patches import model_hook

    model_hook.install()

    from vllm_kvflow.patches import stream_stats

    stream_stats.install()  # API-server process only
