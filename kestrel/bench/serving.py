"""`kestrel bench serve`: drive an OpenAI-compatible server and measure serving latency.

Owns: arrival schedules (Poisson, or gamma for burstiness), the streaming client, the
per-request timings (TTFT, inter-token latency, TPOT, end-to-end), the summary statistics,
the printed table, the JSON result and the latency-vs-rate plot. Works against any
OpenAI-compatible server: it only uses streaming /v1/completions or /v1/chat/completions
(plus /v1/models when no model name is given). Must not import the engine.

Per request, with t0 = when the request was sent:

    t0 ---- first text chunk ---- chunk ---- chunk ---- ... ---- last chunk (end)
       TTFT                  ITL       ITL          ITL
    E2E = end - t0;   TPOT = (E2E - TTFT) / (output_tokens - 1)
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kestrel.bench.datasets import BenchRequest, to_messages

PERCENTILES = (50, 90, 99)


@dataclass
class ClientConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "completions"  # completions | chat
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    max_concurrency: int | None = None  # most requests in flight at once (None: no limit)
    burstiness: float = 1.0  # gamma shape of inter-arrival times; 1 = Poisson
    seed: int = 0
    ignore_eos: bool = True  # ask for exactly output_len tokens (kestrel/vLLM extra field)
    temperature: float = 0.0
    timeout_s: float = 600.0


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


def arrival_delays(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request. rate = inf sends everything at once; otherwise
    gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)), whose mean is 1/rate;
    burstiness 1 is a Poisson process, < 1 burstier, > 1 more regular."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    if math.isinf(rate):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), size=num).tolist()


def _payload(cfg: ClientConfig, model: str, req: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "max_tokens": req.output_len, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": cfg.temperature,
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = to_messages(req)
    else:
        body["prompt"] = req.prompt if req.prompt is not None else json.dumps(req.messages)
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        text += (delta.get("content") or "") if isinstance(delta, dict) else (
            choice.get("text") or "")
    return text


async def send_request(session: Any, cfg: ClientConfig, model: str, req: BenchRequest
                       ) -> RequestResult:
    """One streaming request; never raises (failures are results with ok=False)."""
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    result = RequestResult(ok=False, prompt_len=req.prompt_len)
    start = time.perf_counter()
    last = start
    chunks_with_text = 0
    try:
        async with session.post(cfg.base_url.rstrip("/") + path, json=_payload(cfg, model, req),
                                headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    return result
                now = time.perf_counter()
                if _chunk_text(chunk):
                    if chunks_with_text == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks_with_text += 1
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_len = int(usage.get("prompt_tokens") or req.prompt_len)
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks_with_text
    result.ok = chunks_with_text > 0 or result.output_tokens > 0
    if not result.ok:
        result.error = "no output"
    return result


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean and percentiles in milliseconds (0 when there are no values)."""
    if not values:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    arr = np.asarray(values) * scale
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p))
                                          for p in PERCENTILES}}


def summarize(results: list[RequestResult], duration: float, rate: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors = [r.error for r in results if not r.ok and r.error]
    return {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "duration_s": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": errors[:5],
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
        "ttft_ms": _stats([r.ttft for r in done]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in done for x in r.itl]),
        "e2e_ms": _stats([r.e2e for r in done]),
    }


async def run_benchmark(requests: list[BenchRequest], cfg: ClientConfig, rate: float
                        ) -> dict[str, Any]:
    """Send every request on the arrival schedule for `rate` (req/s); return the summary."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = cfg.model or await _first_model(session, cfg)
        gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def one(req: BenchRequest) -> RequestResult:
            if gate is None:
                return await send_request(session, cfg, model, req)
            async with gate:
                return await send_request(session, cfg, model, req)

        delays = arrival_delays(len(requests), rate, cfg.burstiness, cfg.seed)
        tasks = []
        start = time.perf_counter()
        for req, delay in zip(requests, delays, strict=True):
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(list(results), duration, rate)
    summary.update(model=model, endpoint=cfg.endpoint, num_prompts=len(requests),
                   max_concurrency=cfg.max_concurrency, burstiness=cfg.burstiness)
    return summary


async def _first_model(session: Any, cfg: ClientConfig) -> str:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    async with session.get(cfg.base_url.rstrip("/") + "/v1/models", headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET /v1/models failed with HTTP {resp.status}; pass --model")
        data = await resp.json()
    if not data.get("data"):
        raise RuntimeError("the server lists no models; pass --model")
    return str(data["data"][0]["id"])


def format_table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'request rate (req/s)':<34}{summary['request_rate']}",
        f"{'completed / failed':<34}{summary['completed']} / {summary['failed']}",
        f"{'duration (s)':<34}{summary['duration_s']:.2f}",
        f"{'request throughput (req/s)':<34}{summary['request_throughput']:.2f}",
        f"{'output throughput (tok/s)':<34}{summary['output_throughput']:.1f}",
        f"{'total throughput (tok/s)':<34}{summary['total_token_throughput']:.1f}",
        f"{'latency (ms)':<10}{'mean':>12}{'p50':>12}{'p90':>12}{'p99':>12}",
    ]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                      ("e2e_ms", "E2E")):
        s = summary[key]
        lines.append(f"{name:<10}" + "".join(f"{s[k]:>12.1f}" for k in ("mean", "p50", "p90",
                                                                         "p99")))
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    """One row per rate, for BENCHMARKS.md."""
    head = ("| rate (req/s) | done / failed | req/s | out tok/s | TTFT mean / p50 / p99 (ms) "
            "| TPOT mean / p50 / p99 (ms) | ITL mean / p50 / p99 (ms) "
            "| E2E mean / p50 / p99 (ms) |")
    rows = [head, "|" + "---|" * 8]
    for s in summaries:
        cells = [str(s["request_rate"]), f"{s['completed']} / {s['failed']}",
                 f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}"]
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            m = s[key]
            cells.append(f"{m['mean']:.0f} / {m['p50']:.0f} / {m['p99']:.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_latency_vs_rate(summaries: list[dict[str, Any]], path: str) -> None:
    """p50 and p99 of TTFT, TPOT and E2E against the offered request rate (evenly spaced,
    an infinite rate last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rank = lambda s: math.inf if s["request_rate"] == "inf" else float(s["request_rate"])
    ordered = sorted(summaries, key=rank)
    xs = list(range(len(ordered)))
    labels = [f"{s['request_rate']:g}" if s["request_rate"] != "inf" else "inf"
              for s in ordered]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for pct, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(xs, [s[key][pct] for s in ordered], style, label=pct)
        ax.set_xticks(xs, labels)
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"kestrel bench serve: {ordered[0].get('model', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_rates(requests: list[BenchRequest], cfg: ClientConfig, rates: list[float],
              result_json: str | None = None, plot: str | None = None,
              num_warmups: int = 1) -> list[dict[str, Any]]:
    """The `bench serve` driver: warm up, run each rate in turn, print, save, plot."""
    if num_warmups > 0:
        asyncio.run(run_benchmark(requests[:num_warmups], cfg, math.inf))
    summaries = []
    for rate in rates:
        summary = asyncio.run(run_benchmark(requests, cfg, rate))
        print(format_table(summary), flush=True)
        print(flush=True)
        summaries.append(summary)
    if result_json:
        with open(result_json, "w") as f:
            json.dump({"config": asdict(cfg) | {"api_key": None}, "results": summaries}, f,
                      indent=2)
    if plot:
        plot_latency_vs_rate(summaries, plot)
    return summaries



# ---------------------------------------------------------------------------- command line
def add_arguments(parser: Any) -> None:
    """Flags of `kestrel bench serve`."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="server root (default: http://127.0.0.1:8000)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--model", help="model name to send (default: the server's first)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--dataset", default="random",
                        help="'random' (seeded synthetic prompts) or a JSONL file of "
                             "{\"prompt\": ...} / {\"messages\": [...]} lines")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=128, help="random prompts: tokens")
    parser.add_argument("--output-len", type=int, default=128,
                        help="max_tokens per request (JSONL lines may set their own)")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="random lengths: uniform in len * [1 - r, 1 + r]")
    parser.add_argument("--prefix-len", type=int, default=0,
                        help="random prompts: tokens of a prefix shared by all prompts")
    parser.add_argument("--tokenizer", help="HF tokenizer folder: exact random prompt lengths")
    parser.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                        help="requests per second, one run per value (default: inf, all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of arrivals: 1 = Poisson, < 1 burstier")
    parser.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at EOS (default: ask for exactly output-len)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-warmups", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--result-json", help="write every run's summary here")
    parser.add_argument("--plot", help="draw latency vs request rate into this PNG")


def run(args: Any) -> int:
    from kestrel.bench.datasets import load_jsonl, random_requests

    tokenizer = None
    if args.tokenizer:
        from kestrel.engine.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    if args.dataset == "random":
        requests = random_requests(args.num_prompts, args.input_len, args.output_len,
                                   range_ratio=args.range_ratio, seed=args.seed,
                                   tokenizer=tokenizer, prefix_len=args.prefix_len)
    else:
        requests = load_jsonl(args.dataset, output_len=args.output_len, num=args.num_prompts,
                              seed=args.seed)
    cfg = ClientConfig(base_url=args.base_url, endpoint=args.endpoint, model=args.model,
                       api_key=args.api_key, max_concurrency=args.max_concurrency,
                       burstiness=args.burstiness, seed=args.seed, ignore_eos=args.ignore_eos,
                       temperature=args.temperature, timeout_s=args.timeout)
    summaries = run_rates(requests, cfg, list(args.request_rate), args.result_json, args.plot,
                          args.num_warmups)
    print(markdown_table(summaries))
    return 0 if all(s["failed"] == 0 for s in summaries) else 1
