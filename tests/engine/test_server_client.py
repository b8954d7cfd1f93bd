"""The client, the `kvflow warm` / `kvflow query` commands, tenant isolation, the
/metrics counters and a smoke run of `kvflow bench load`, against one real server."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

import vllm_kvflow
from vllm_kvflow.client import KVFlowClient, ServerError
from vllm_kvflow.server import ServerProcess, cpu_server_args

pytestmark = pytest.mark.engine

DOCS = ["Zorbia\nThe capital of Zorbia is Quellport, a harbor city on the eastern coast.",
        "Mirevale\nThe mayor of Mirevale is Ada Finch, elected in the spring of 1902.",
        "Tolm\nTolm exports copper and salt through the port of Quellport."]


@pytest.fixture(scope="module")
def server_process(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    # Step lines on (log_steps_every_s): the probe smoke test reads them from the log.
    with ServerProcess(model_path, log, vllm_kvflow.transfer_config(log_steps_every_s=0.5),
                       cpu_server_args(model_path, 1024, 8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(server_process):
    return server_process.base_url


@pytest.fixture(scope="module")
def client(server):
    return KVFlowClient(server)


def _docs(tag: str) -> list[str]:
    # Fresh documents per test: the store is shared by the module's tests.
    return [f"{d} Record {tag}." for d in DOCS]


def test_warm_then_query_hits_the_store(client):
    docs = _docs("warm")
    warmed = client.warm(docs, batch_size=2)
    assert [s["chunks_missed"] for s in warmed] == [2, 1]
    assert sum(s["chunks_hit"] for s in warmed) == 0

    r = client.query("What is the capital of Zorbia?", docs, max_tokens=8)
    # Streamed response: stats arrive in the last event (patches/stream_stats.py).
    assert r.stats["fallback"] is None and r.stats["chunks_unlocatable"] == []
    assert (r.stats["chunks_hit"], r.stats["chunks_missed"]) == (3, 0)
    assert r.stats["tokens_reused"] == r.stats["chunk_tokens"] > 0
    assert r.usage["completion_tokens"] >= 1 and r.text
    assert 0 < r.ttft_s <= r.latency_s


def test_started_as_the_readme_shows_it_logs_each_requests_stats(server_process, client):
    """`vllm serve MODEL --kv-transfer-config ...` from the venv, as the README starts it;
    with log_stats on (the default) each request's stats reach the server log."""
    assert server_process.argv[1:3] == ["serve", client.model]
    assert server_process.argv[0].endswith("/vllm")
    r = client.query("What is the capital of Zorbia?", _docs("log"), max_tokens=2)
    assert r.stats["chunks"] == 3  # streamed stats under `vllm serve`
    deadline = time.monotonic() + 10
    while "kvflow: request" not in server_process.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    logged = [line for line in server_process.log_path.read_text().splitlines() if "kvflow: request" in line]
    assert logged and "'chunks': 3" in logged[-1], logged[-3:]


def test_streamed_answer_equals_non_streamed(client):
    docs = _docs("stream")
    body = client.chat_body(docs, "Who is the mayor of Mirevale?", method="full", max_tokens=8)
    plain = client.post_json("/v1/chat/completions", body)
    r = client.query("Who is the mayor of Mirevale?", docs, method="full", max_tokens=8)
    assert r.text == plain["choices"][0]["message"]["content"]
    assert r.stats["method"] == "full" == plain["kv_transfer_params"]["kvflow_stats"]["method"]


def test_http_errors_carry_the_servers_message(client):
    with pytest.raises(ServerError) as e:
        client.query("Why?", ["word " * 2000], max_tokens=4)
    msg = e.value.message.lower()
    assert e.value.status == 400 and ("context length" in msg or "maximum" in msg), msg
    with pytest.raises(ServerError) as e:
        client.post_json("/v1/chat/completions", {"model": client.model, "messages": "not a list"})
    assert 400 <= e.value.status < 500 and e.value.message


def test_tenant_salt_isolates_the_chunk_store(client):
    docs = _docs("tenant")
    q = "What does Tolm export?"
    client.warm(docs, cache_salt="tenant-a")
    other = client.query(q, docs, cache_salt="tenant-b", max_tokens=4).stats
    assert (other["chunks_hit"], other["chunks_missed"]) == (0, 3)  # computed afresh
    same = client.query(q, docs, cache_salt="tenant-a", max_tokens=4).stats
    assert (same["chunks_hit"], same["chunks_missed"]) == (3, 0)
    # A namespace isolates the same way, within one tenant.
    ns = client.query(q, docs, cache_salt="tenant-a", namespace="team-2", max_tokens=4).stats
    assert (ns["chunks_hit"], ns["chunks_missed"]) == (0, 3)


def _scrape(client) -> dict[str, float]:
    """kvflow samples and the KV-usage gauge of /metrics: {name{labels}: value}."""
    out = {}
    for line in client.metrics_text().splitlines():
        if line.startswith(("vllm:kvflow_", "vllm:kv_cache_usage_perc")):
            name, value = line.rsplit(" ", 1)
            name = re.sub(r'(model_name|engine)="[^"]*",?', "", name).replace("{}", "")
            out[name] = out.get(name, 0.0) + float(value)
    return out


def _delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_metrics_count_what_the_stats_report(client):
    before = _scrape(client)
    assert "vllm:kvflow_chunk_hits_total" in before  # registered at startup
    docs = _docs("metrics")
    stats = [s for s in client.warm(docs)]
    stats.append(client.query("Who is the mayor of Mirevale?", docs, max_tokens=4).stats)
    # One chunk not in the prompt (unlocatable), then a malformed declaration.
    body = client.chat_body(docs[:2], "Who?", max_tokens=2)
    body["kv_transfer_params"]["kvflow"]["chunks"].append({"text": "Not in this prompt at all."})
    stats.append(client.post_json("/v1/chat/completions", body)["kv_transfer_params"]["kvflow_stats"])
    body["kv_transfer_params"]["kvflow"]["ratio"] = -1
    stats.append(client.post_json("/v1/chat/completions", body)["kv_transfer_params"]["kvflow_stats"])
    assert stats[-2]["chunks_unlocatable"] == [2] and stats[-1]["fallback"] == "bad-request"

    expected = {
        "vllm:kvflow_requests_total": len(stats),
        "vllm:kvflow_chunk_hits_total": sum(s.get("chunks_hit", 0) for s in stats),
        "vllm:kvflow_chunk_misses_total": sum(s.get("chunks_missed", 0) for s in stats),
        "vllm:kvflow_chunks_unlocatable_total": 1,
        "vllm:kvflow_tokens_reused_total": sum(s.get("tokens_reused", 0) for s in stats),
        "vllm:kvflow_tokens_recomputed_total": sum(s.get("tokens_recomputed", 0) for s in stats),
        'vllm:kvflow_fallbacks_total{reason="bad-request"}': 1,
    }
    assert expected["vllm:kvflow_chunk_hits_total"] >= 5 and expected["vllm:kvflow_chunk_misses_total"] == 3
    # The API server records engine stats asynchronously: wait for the last request.
    deadline = time.monotonic() + 20
    while True:
        after = _scrape(client)
        got = {k: _delta(after, before, k) for k in expected}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == expected
    # Store gauges: what the worker's store reported with the last load, per tier.
    store = stats[-2]["store"]
    tiers = store.get("tiers") or {"host": store}
    for tier, snap in tiers.items():
        if "bytes" in snap:
            assert after[f'vllm:kvflow_store_bytes{{tier="{tier}"}}'] == snap["bytes"]
    assert after.get('vllm:kvflow_store_bytes{tier="host"}', 0) > 0


def test_cli_warm_and_query(server, tmp_path):
    docs = _docs("cli")
    (tmp_path / "a.txt").write_text(docs[0] + "\n---\n" + docs[1])
    (tmp_path / "b.md").write_text(docs[2])
    cli = [sys.executable, "-m", "vllm_kvflow.cli"]
    warm = subprocess.run(cli + ["warm", "--server", server, "--docs", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert warm.returncode == 0, warm.stderr
    assert "warmed 3 documents" in warm.stdout and "3 computed, 0 already stored" in warm.stdout
    assert "3/3 documents" in warm.stderr  # progress bar
    query = subprocess.run(cli + ["query", "--server", server, "--max-tokens", "4",
                                  "--docs", str(tmp_path), "What does Tolm export?"],
                           capture_output=True, text=True, timeout=300)
    assert query.returncode == 0, query.stderr
    assert re.search(r"ttft \d+\.\d+ s.*hit=3 missed=0 unlocatable=0", query.stdout), query.stdout
    bad = subprocess.run(cli + ["query", "--server", server + "/nowhere", "--docs", str(tmp_path), "q"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "HTTP 404" in bad.stderr


def test_bench_load_smoke(server, tmp_path):
    from vllm_kvflow.bench import load

    out = tmp_path / "load.json"
    rc = load.main(["--server", server, "--requests", "8", "--warmup", "2", "--docs", "6",
                    "--docs-per-request", "3", "--doc-words", "30", "--concurrency", "4",
                    "--max-seconds", "200", "--max-tokens", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0
    full, reuse = result["summaries"]
    assert (full["method"], reuse["method"]) == ("full", "infoflow")
    assert full["completed"] == reuse["completed"] == 8 and full["errors"] == reuse["errors"] == 0
    # Chunk statistics come from the stream, for every request.
    assert full["with_stats"] == reuse["with_stats"] == 8
    assert full["chunk_hit_rate"] is None and reuse["chunk_hit_rate"] > 0
    assert reuse["tokens_reused"] > 0 and reuse["tokens_recomputed"] > 0
    assert 0 < reuse["ttft_p50_s"] <= reuse["ttft_p99_s"]
    assert reuse["first_wave"]["completed"] == 4
    assert result["server_info"]["uptime_at_bench_start_s"] > 0


def test_bench_load_probe_smoke(server_process, tmp_path):
    from vllm_kvflow.bench import load

    server = server_process.base_url
    out = tmp_path / "probe.json"
    rc = load.main(["--server", server, "--probe", "--probe-tokens", "40", "--probe-repeats", "2",
                    "--probe-warmup", "1", "--probe-delay", "0.2", "--burst", "3", "--burst-docs", "2",
                    "--burst-doc-words", "40", "--out", str(out)])
    probe = json.loads(out.read_text())["probe"]
    assert rc == 0 and probe["burst_errors"] == 0
    assert probe["burst_chunks_missed"] == 6  # fresh documents: every chunk a miss
    assert probe["alone_ttft_s"] > 0 and probe["during"] and probe["ratio_max"] > 0
    # The worker's step lines (log_steps_every_s): the burst's misses were blend work.
    time.sleep(0.6)  # the window holding the burst's last steps closes at the next step
    KVFlowClient(server).query("Anything?", _docs("step-lines"), max_tokens=2)
    lines = load.step_lines(server_process.log_path)
    assert lines, "no step lines in the server log"
    worked = [int(m.group(1)) for line in lines
              for m in [re.search(r"steps with blend work (\d+),", line)] if m]
    assert sum(worked) > 0 and all("periods" in line for line in lines)


def test_bench_load_settings_only_for_a_spawned_server(server, capsys):
    from vllm_kvflow.bench import load

    for bad, message in ((["--server", server, "--settings", "{}"], "spawned server"),
                         (["--spawn", "--settings", "[1]"], "JSON object"),
                         (["--spawn", "--settings", "{nope"], "not JSON"),
                         (["--spawn", "--settings", '{"log_steps_every_s": 0}'], "log_steps_every_s"),
                         (["--spawn", "--settings", '{"no_such": 1}'], "unknown settings")):
        with pytest.raises(SystemExit) as e:
            load.main(bad)
        assert e.value.code == 2 and message in capsys.readouterr().err, bad


def test_sigusr1_prints_the_servers_stacks_and_it_keeps_serving(server_process, client):
    """`kill -USR1` on the API server and on its engine core (the plugin's handler,
    README "Serving"): each prints its Python stacks into the server log, and the server
    still answers."""
    import psutil

    api = psutil.Process(server_process.proc.pid)
    engines = [p for p in api.children(recursive=True)
               if "EngineCore" in p.name() or any("EngineCore" in a for a in p.cmdline())]
    assert engines, [(p.name(), p.cmdline()[:3]) for p in api.children(recursive=True)]
    before = server_process.log_path.read_text().count("Current thread 0x")
    for proc in [api, *engines]:
        proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while (server_process.log_path.read_text().count("Current thread 0x") < before + 1 + len(engines)
           and time.monotonic() < deadline):
        time.sleep(0.2)
    assert server_process.log_path.read_text().count("Current thread 0x") == before + 1 + len(engines)
    r = client.query("What is the capital of Zorbia?", _docs("sigusr1"), max_tokens=2)
    assert r.stats["chunks"] == 3 and api.is_running() and all(p.is_running() for p in engines)
