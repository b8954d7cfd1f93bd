"""One validated settings object, read from `kv_connector_extra_config`.

Every setting has a documented default (README, "Settings"); unknown names are an error
so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vllm_kvflow.blend.selection import METHODS as _REGISTERED

# Every registered blend method (blend/selection.py), in registration order.
METHODS = tuple(_REGISTERED)
# Which images of a request are chunks (vision/image_declaration.py), and the attention
# of the vision encoder's full-attention blocks (vision/encoder_attention.py).
IMAGE_CHUNK_MODES = ("declared", "all")
VISION_ATTENTION = ("stock", "hilberta")
# Where a GPU engine's blend work runs (blend/side_stream.py).
BLEND_STREAMS = ("side", "background", "main")


@dataclass(frozen=True)
class KVFlowConfig:
    # Selection method used when a request does not name one (see blend/selection.py).
    method: str = "infoflow"
    # Fraction rho of chunk tokens recomputed (1.0 reproduces full prefill).
    recompute_ratio: float = 0.15
    # Chunk store tiers, per worker, in GiB (README "Chunk store tiers"). The first
    # memory tier is device memory on GPU and host RAM on CPU (there is no separate
    # device tier on CPU); store_capacity_gb sizes it unless store_device_gb (GPU) or
    # store_host_gb (CPU) is given. On GPU, store_host_gb adds a host tier below it.
    store_capacity_gb: float = 2.0
    store_device_gb: float | None = None
    store_host_gb: float | None = None
    # Disk tier: a directory (None: no disk tier) and its capacity.
    store_disk_path: str | None = None
    store_disk_gb: float = 10.0
    # Seconds the disk tier's start-up scan may take; files it has not read by then are
    # treated as absent (a slow or huge directory must not hold up the engine's start).
    store_disk_scan_s: float = 30.0
    # Remote tier shared by replicas (README "Shared tier"): a Redis/Valkey URL (None:
    # none), its size (advisory: the server's maxmemory holds), socket timeouts and the
    # bound of its write queue.
    store_remote_url: str | None = None
    store_remote_gb: float | None = None
    store_remote_connect_timeout_s: float = 0.5
    store_remote_timeout_s: float = 1.0
    store_remote_queue_mb: float = 256.0
    # Fixed sink prefix chunks are computed behind, in isolation. None: [BOS].
    sink_token_ids: tuple[int, ...] | None = None
    # Default namespace folded into chunk identity (requests may add a cache_salt).
    namespace: str = ""
    # Scoring layers for infoflow: absolute indices (ints) or depth fractions in
    # [0, 1) (floats). None: 4 consecutive layers from 69% depth (the paper's 22-25
    # of 32; on SmolLM2's 30 layers, 21-24 closed the most of the gap in an exploratory
    # sweep, benchmarks/QUALITY_NOTES.md).
    scoring_layers: tuple[int | float, ...] | None = None
    # Seed of the `random` baseline.
    seed: int = 0
    # Log one line of stats per request.
    log_stats: bool = True
    # Log, every this many seconds, the engine's step periods and the connector's host
    # time per step as the worker sees them (blend/step_log.py); None: off.
    log_steps_every_s: float | None = None
    # When no engine step finishes for this many seconds while blend work is pending,
    # log what was pending and every thread's Python stack (blend/stall_watch.py),
    # once per stall; None: off.
    stall_report_s: float | None = 120.0
    # Blend work one engine step may carry (loads are asynchronous: vLLM keeps
    # scheduling other requests meanwhile), in rows through the model's layers: the
    # signal and recompute passes of ready requests, and the isolated computes of store
    # misses. None: an eighth of vLLM's max_num_batched_tokens each. A lone request, with
    # no other in the step's forward, runs whole (where steps are timed, its misses do
    # not: see below).
    max_blend_tokens_per_step: int | None = None
    max_isolated_tokens_per_step: int | None = None
    # A step whose forward holds requests in their first forward runs no blend work, so
    # that their first token does not share the GPU (or the host) with it; at most this
    # many such steps in a row, so that a stream of arrivals cannot starve the blend work.
    max_yield_steps: int = 1
    # CPU engines, one rank: the same blend work also bounded in time, milliseconds of
    # it per step (null: rows only), so that a small request arriving during a burst
    # of misses waits for a short step. Rows are turned into time by the cost per row
    # measured on earlier passes; a lone request loads asynchronously, its misses in
    # these steps. On GPU the passes are queued asynchronously (timing them would make
    # the host wait) and the row budgets, cheap there, are the bound.
    max_blend_ms_per_step: float | None = 200.0
    # GPU engines of one rank: "side" runs the blend work on a CUDA stream of its own,
    # beside the step's forward (a load is reported once that stream has passed it), so
    # small requests wait less during bursts of misses and a step may carry more blend
    # work (step_budget) (blend/side_stream.py); "background" is the same with vLLM's
    # stream lifted above it in priority (patches/forward_priority.py); "main" queues it
    # on vLLM's stream ahead of the forward. CPU engines and several tensor-parallel ranks
    # run it inline whatever this says. "side" is the default since its GPU hang was
    # found and fixed (kvflow's own streams, blend/private_stream.py; README, "Under load").
    blend_stream: str = "side"
    # Isolated computes one request may cause, at most this multiple of its prompt's
    # tokens (each computed segment also counts 32 rows); beyond, it is prefilled.
    max_isolated_tokens_per_prompt_token: float = 4.0
    # Loads queued at once; further requests wait in vLLM's queue until one finishes.
    max_pending_loads: int = 256
    # Limits on what one request may declare (README "Engine settings"). A declaration
    # of more chunks is prefilled in full (fallback "bad-request"): each chunk costs a
    # lookup, and a miss a model pass of its own, so thousands of tiny chunks cost many
    # times the full prefill of the same prompt. 1024 is ~3x the chunks of a 32K-token
    # prompt of 100-token passages.
    max_chunks: int = 1024
    # A located chunk shorter than this is not reused: its tokens are prefilled like the
    # rest of the prompt (listed in the stats' chunks_too_short). A miss costs a whole
    # model pass whatever its length, which for a few tokens costs more than prefilling
    # them; real passages are tens to hundreds of tokens.
    min_chunk_tokens: int = 16
    # Images as chunks: "declared" (those a request names with {"image": i}, and any in
    # the reused context) or "all" (every image of every request).
    image_chunks: str = "declared"
    # The vision encoder's full-attention blocks: "stock" (vLLM's attention) or
    # "hilberta" (HilbertA sparse attention; changes the encoder's outputs).
    vision_attention: str = "stock"
    # Put the recomputed positions (prompt coordinates) into each request's stats as
    # `selected_positions`, for checking a selection against an outside reference.
    debug_selection: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"kvflow: method must be one of {METHODS}, got {self.method!r}")
        check_ratio(self.recompute_ratio)
        for name in ("store_capacity_gb", "store_device_gb", "store_host_gb", "store_disk_gb",
                     "store_disk_scan_s", "store_remote_gb", "store_remote_queue_mb"):
            value = getattr(self, name)
            if value is None and name in ("store_device_gb", "store_host_gb", "store_remote_gb"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"kvflow: {name} must be a number >= 0, got {value!r}")
        for name in ("max_blend_tokens_per_step", "max_isolated_tokens_per_step"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"kvflow: {name} must be a positive integer or null, got {value!r}")
        for name in ("max_blend_ms_per_step", "log_steps_every_s", "stall_report_s"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0):
                raise ValueError(f"kvflow: {name} must be a number > 0 or null, got {value!r}")
        if (isinstance(self.max_pending_loads, bool) or not isinstance(self.max_pending_loads, int)
                or self.max_pending_loads < 1):
            raise ValueError(f"kvflow: max_pending_loads must be a positive integer, got {self.max_pending_loads!r}")
        limit = self.max_isolated_tokens_per_prompt_token
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            raise ValueError("kvflow: max_isolated_tokens_per_prompt_token must be a number > 0, "
                             f"got {limit!r}")
        if (isinstance(self.max_yield_steps, bool) or not isinstance(self.max_yield_steps, int)
                or self.max_yield_steps < 0):
            raise ValueError(f"kvflow: max_yield_steps must be an integer >= 0, got {self.max_yield_steps!r}")
        for name in ("max_chunks", "min_chunk_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"kvflow: {name} must be an integer >= 1, got {value!r}")
        for name, allowed in (("image_chunks", IMAGE_CHUNK_MODES),
                              ("vision_attention", VISION_ATTENTION),
                              ("blend_stream", BLEND_STREAMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"kvflow: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.store_disk_path is not None and (
                not isinstance(self.store_disk_path, str) or not self.store_disk_path):
            raise ValueError("kvflow: store_disk_path must be a non-empty string")
        if self.store_remote_url is not None:
            from vllm_kvflow.store.remote import check_url  # the store imports without redis

            check_url(self.store_remote_url)
        for name in ("store_remote_connect_timeout_s", "store_remote_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"kvflow: {name} must be a number > 0, got {value!r}")
        if self.sink_token_ids is not None:
            object.__setattr__(self, "sink_token_ids", tuple(int(t) for t in self.sink_token_ids))
            if not self.sink_token_ids:
                raise ValueError("kvflow: sink_token_ids must not be empty")
        if not isinstance(self.debug_selection, bool):
            raise ValueError(f"kvflow: debug_selection must be true or false, got {self.debug_selection!r}")
        if self.scoring_layers is not None:
            layers = tuple(self.scoring_layers)
            if not layers or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in layers):
                raise ValueError("kvflow: scoring_layers must be a non-empty list of numbers")
            object.__setattr__(self, "scoring_layers", layers)

    @property
    def store_capacity_bytes(self) -> int:
        return _gib(self.store_capacity_gb)

    @property
    def store_disk_bytes(self) -> int:
        return _gib(self.store_disk_gb)

    @property
    def store_remote_bytes(self) -> int | None:
        return None if self.store_remote_gb is None else _gib(self.store_remote_gb)

    def store_memory_tiers(self, on_device: bool) -> list[tuple[str, int]]:
        """(name, capacity bytes) of the memory tiers, first (fastest) first."""
        if not on_device:
            host = self.store_host_gb if self.store_host_gb is not None else self.store_capacity_gb
            return [("host", _gib(host))]
        device = self.store_device_gb if self.store_device_gb is not None else self.store_capacity_gb
        tiers = [("device", _gib(device))]
        if self.store_host_gb:
            tiers.append(("host", _gib(self.store_host_gb)))
        return tiers

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> "KVFlowConfig":
        extra = dict(extra or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - names)
        if unknown:
            raise ValueError(f"kvflow: unknown settings {unknown}; known: {sorted(names)}")
        return cls(**extra)

    def to_extra_config(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _gib(gb: float) -> int:
    return int(gb * (1 << 30))


def check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"kvflow: recompute ratio must be a number in [0, 1], got {ratio!r}")
    return float(ratio)


# Changing it changes infoflow's results: bump REUSE_VERSION in bench/quality.py too.
DEFAULT_SCORING_DEPTH = 0.69


def resolve_layers(spec: tuple[int | float, ...] | None, num_layers: int) -> list[int]:
    """Scoring layer indices for a model of num_layers layers."""
    if spec is None:
        start = min(int(round(DEFAULT_SCORING_DEPTH * num_layers)), max(num_layers - 4, 0))
        return list(range(start, min(start + 4, num_layers)))
    out = []
    for x in spec:
        idx = int(x) if isinstance(x, int) else int(x * num_layers)
        if not 0 <= idx < num_layers:
            raise ValueError(f"kvflow: scoring layer {x!r} outside a {num_layers}-layer model")
        out.append(idx)
    return sorted(set(out))
