"""KVFlowConnector: vLLM's KV-connector v1 interface, delegating to one side per role.

Registered under the name "KVFlowConnector" by the plugin; also loadable with
`kv_connector_module_path="vllm_kvflow.connector.connector"`.
"""
from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from vllm_kvflow.config import KVFlowConfig


class KVFlowConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None, *args, **kwargs):
        super().__init__(vllm_config, role, kv_cache_config, *args, **kwargs)
        transfer = vllm_config.kv_transfer_config
        self.config = KVFlowConfig.from_extra_config(transfer.kv_connector_extra_config)
        self._scheduler = self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from vllm_kvflow.connector.scheduler import KVFlowScheduler
            from vllm_kvflow.connector.worker import device_type, timed_steps

            # The store holds chunk KV on the model's device: host memory on CPU engines.
            cpu = device_type(vllm_config) == "cpu"
            self._scheduler = KVFlowScheduler(self.config, vllm_config.model_config.tokenizer,
                                              store_tier="host" if cpu else "device",
                                              sync_loads=not timed_steps(self.config, vllm_config))
        else:
            from vllm_kvflow.connector.worker import KVFlowWorker

            self._worker = KVFlowWorker(self.config, vllm_config)

    # ==============================
    # Worker-side methods
    # ==============================
    def register_kv_caches(self, kv_caches):
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        # Loads are asynchronous (see the scheduler side): whether vLLM calls this before
        # the step's forward (0.26) or after it (0.32), no forward reads this KV until
        # get_finished has reported it.
        self._worker.start_load_kv(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]):
        return self._worker.get_finished(finished_req_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return  # chunks are stored when computed in isolation, not from requests

    def wait_for_save(self):
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors()

    def shutdown(self):
        if self._worker is not None:
            self._worker.shutdown()

    def build_connector_worker_meta(self):
        return self._worker.build_worker_meta()

    # ==============================
    # Scheduler-side methods
    # ==============================
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output):
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request, block_ids):
        return self._scheduler.request_finished(request, block_ids)

    # ==============================
    # Metrics (vLLM's connector-stats path; see patches/connector_metrics.py)
    # ==============================
    def get_kv_connector_stats(self):
        # Counted on the scheduler side, which sees every request's final stats; the
        # worker side reports nothing of its own.
        if self._scheduler is None:
            return None
        from vllm_kvflow.patches.connector_metrics import make_stats

        return make_stats(self._scheduler.counters.drain())

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        from vllm_kvflow.patches.connector_metrics import make_stats

        return make_stats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from vllm_kvflow.patches.connector_metrics import make_prom_metrics

        return make_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
