"""The library end to end: engines, an in-process gateway, requests, metrics, clean-up.

    python examples/library_quickstart.py --model ./my-model            # any local vLLM model
    python examples/library_quickstart.py --model .tinymodels/tiny-qwen2 # the tests' tiny model

It starts one llm engine and one MiniLM embedding engine (in a private state directory
unless --home is given), serves them through a gateway in this process with priority
scheduling, sends chat, completion, streaming and embedding requests, submits requests
with priorities, prints the gateway's aggregate metrics, and stops everything it started,
also on Ctrl-C or an error. See docs/library.md.
"""

from __future__ import annotations

import argparse
import tempfile

from sagellm_cli import ControlPlane, SageError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local model path (or HF id)")
    parser.add_argument("--embedding", default="all-MiniLM-L6-v2")
    parser.add_argument("--home", help="state directory (default: a temporary one)")
    args = parser.parse_args()

    cp = ControlPlane(home=args.home or tempfile.mkdtemp(prefix="sagellm-example-"))
    started = []
    try:
        print("starting engines (tens of seconds on a CPU) ...")
        llm = cp.start_engine(args.model, served_model_name="chat", max_model_len=512)
        started.append(llm.id)
        emb = cp.start_engine(args.embedding, kind="embedding", label="emb")
        started.append(emb.id)
        for record in cp.engines():
            print(f"  {record.id} {record.kind:9} {record.served_model_name} {record.url}")

        with cp.serve(background=False, scheduling="priority") as gateway:
            print(f"gateway at {gateway.v1}")
            with gateway.client() as client:
                print("chat:      ", repr(client.chat("Say hi.", model="chat", max_tokens=16)))
                print(
                    "generate:  ", repr(client.generate("Once upon", model="chat", max_tokens=16))
                )
                print("stream:    ", end=" ", flush=True)
                for delta in client.chat(
                    "Count to five.", model="chat", stream=True, max_tokens=16
                ):
                    print(delta, end="", flush=True)
                print()
                vectors = client.embed(["a cat", "a dog"], model="emb")
                print(f"embed:      {len(vectors)} vectors of {len(vectors[0])} floats")

            handles = [
                cp.submit_request("Hello", model="chat", priority=p, max_tokens=8)
                for p in ("low", "normal", "critical")
            ]
            for handle in handles:
                result = handle.result(timeout=120)
                print(f"{handle.priority:8} -> {result.latency_s * 1000:.0f} ms on {result.engine}")

            m = cp.metrics(window=60)
            print(
                f"metrics: {m.completed_requests} completed, {m.requests_per_second:.2f} req/s, "
                f"{m.tokens_per_second:.1f} tok/s, p50/p95/p99 "
                f"{m.total.latency_ms.p50}/{m.total.latency_ms.p95}/{m.total.latency_ms.p99} ms, "
                f"TTFT p50 {m.total.ttft_ms.p50} ms"
            )
    except SageError as exc:
        print(f"error: {exc.one_line()}")
        if exc.details:
            print(exc.details)
        return exc.exit_code
    finally:
        for engine_id in started:  # engines are processes of their own: stop them
            cp.stop_engine(engine_id)
        cp.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
