"""Every Python sample of the seeds (shared/seeds/001, 002, 004) runs, against real engines.

One tiny vLLM engine and one MiniLM embedding engine run for the module, in a home of
their own: to the samples they are the "vLLM instances started beforehand" that
seeds 001/002 register. Each sample is the seed's code with only its import line and
its addresses adapted: `host`/`port` are the tiny engine's (HOST, PORT) and
`model_name` is what it serves (MODEL), since a registered instance must serve the
model it is registered with. Samples that are definitions of the seed's own internals
(002's "Types", "Manager", "Executor", ... class skeletons) are not run; the checks
after a sample use the library's API, not the sample's. Every manager a test starts is
stopped at its end, also on failure, and the module's finaliser stops the engines.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from conftest import needs_st, needs_vllm, sage, sage_json, stop_all_engines

pytestmark = [pytest.mark.engines, needs_vllm, needs_st]

# The addresses the samples use (set from the running engines).
HOST = "127.0.0.1"
PORT = 0
MODEL = "tiny"


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_model):
    """The tiny llm engine and MiniLM, started at once in their own home."""
    import concurrent.futures

    global PORT
    home = tmp_path_factory.mktemp("seed-engines") / "sagellm"
    llm_args = ("llm", "engine", "start", str(tiny_model), "--served-model-name", MODEL,
                "--label", "tiny", "--max-model-len", "1024", "--kv-cache-gb", "0.0625",
                "--timeout", "400")  # fmt: skip
    emb_args = ("llm", "engine", "start", "all-MiniLM-L6-v2", "--engine-kind", "embedding",
                "--label", "minilm", "--timeout", "300")  # fmt: skip
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            llm = pool.submit(sage_json, *llm_args, home=home, timeout=450)
            emb = pool.submit(sage_json, *emb_args, home=home, timeout=350)
            llm, emb = llm.result(), emb.result()
        assert llm["status"] == "ready" and emb["status"] == "ready"
        PORT = llm["port"]
        yield {"home": home, "llm": llm, "embedding": emb}
    finally:
        sage("llm", "serve", "--stop", home=home, timeout=60)
        stop_all_engines(home)


@pytest.fixture
def seed_home(home, servers):
    """A fresh home for the samples' managers; every manager still running is stopped."""
    from sagellm_cli.seed.manager import stop_all

    try:
        yield home
    finally:
        stop_all()


def _labels(home) -> dict[str, dict]:
    return {r["label"]: r for r in sage_json("llm", "engine", "list", home=home)}


# -- seed 001 ------------------------------------------------------------------------


def test_seed001_quick_start(seed_home, capsys):
    import asyncio

    from sagellm_cli import (
        ControlPlaneManager,
        ExecutionInstance,
        RequestMetadata,
        RequestPriority,
    )

    async def main():
        # 1. 创建控制平面管理器
        manager = ControlPlaneManager(
            scheduling_policy="adaptive",  # 自适应调度
            routing_strategy="load_balanced",  # 负载均衡
            enable_monitoring=True,
        )

        # 2. 注册 vLLM 实例
        instance = ExecutionInstance(
            instance_id="vllm-1",
            host=HOST,
            port=PORT,
            model_name=MODEL,
            tensor_parallel_size=2,
            gpu_count=2,
            max_concurrent_requests=100,
        )
        manager.register_instance(instance)

        # 3. 启动控制平面
        await manager.start()

        # 4. 提交推理请求
        request = RequestMetadata(
            request_id="req-001",
            user_id="user-123",
            priority=RequestPriority.HIGH,
            slo_deadline_ms=1000,  # 1秒SLO
            max_tokens=512,
            prompt="Explain quantum computing in simple terms.",
        )

        request_id = await manager.submit_request(request)
        print(f"Request submitted: {request_id}")

        # 5. 等待并获取结果
        await asyncio.sleep(2)
        status = await manager.get_request_status(request_id)
        print(f"Request status: {status}")

        # 6. 获取性能指标
        metrics = manager.get_metrics()
        print(f"Throughput: {metrics.requests_per_second:.2f} req/s")
        print(f"Avg Latency: {metrics.avg_latency_ms:.2f} ms")

        # 7. 停止控制平面
        await manager.stop()

    asyncio.run(main())
    out = capsys.readouterr().out
    assert "Request submitted: req-001" in out
    assert "Request status: RequestState(request_id='req-001'" in out
    assert "Throughput: " in out and "Avg Latency: " in out
    assert _labels(seed_home) == {}  # stop() unregistered the instance it registered


def test_seed001_pd_separation_routes_by_tokens(seed_home):
    from sagellm_cli import (
        ControlPlaneManager,
        DecodingConfig,
        ExecutionInstance,
        ExecutionInstanceType,
        PDSeparationConfig,
        PrefillingConfig,
        RequestMetadata,
    )

    # 启用 PD 分离
    pd_config = PDSeparationConfig(
        enabled=True,
        routing_policy="adaptive",
        prefilling_threshold_input_tokens=800,
    )
    manager = ControlPlaneManager(
        scheduling_policy="adaptive",
        enable_pd_separation=True,
        pd_config=pd_config,
    )
    # Prefilling 实例 (优化吞吐)
    prefilling_instance = ExecutionInstance(
        instance_id="prefill-1",
        host=HOST,
        port=PORT,
        model_name=MODEL,
        instance_type=ExecutionInstanceType.PREFILLING,
        tensor_parallel_size=4,  # 高吞吐
        gpu_count=4,
        prefilling_config=PrefillingConfig(
            target_batch_size=64,
            enable_chunked_prefill=True,
        ),
    )
    # Decoding 实例 (优化延迟)
    decoding_instance = ExecutionInstance(
        instance_id="decode-1",
        host=HOST,
        port=PORT,
        model_name=MODEL,
        instance_type=ExecutionInstanceType.DECODING,
        tensor_parallel_size=1,  # 低延迟
        gpu_count=1,
        decoding_config=DecodingConfig(
            target_latency_ms=50,
            max_parallel_requests=200,
        ),
    )
    manager.register_instance(prefilling_instance)
    manager.register_instance(decoding_instance)

    # The checks: the threshold counts tokens. A registered instance's tokenizer is not
    # at hand, so the estimate (chars / 4) applies: 3304 chars are 826 tokens (prefill),
    # 2800 chars 700 (decode), although both are over the 2048-*character* default.
    labels = _labels(seed_home)
    assert labels["prefill-1"]["role"] == "prefill" and labels["decode-1"]["role"] == "decode"
    assert labels["decode-1"]["spec"]["max_inflight"] == 200

    async def run():
        served = {}
        for name, words in (("long", 826), ("short", 700)):
            request = RequestMetadata(prompt="the " * words, max_tokens=2)
            result = await manager.wait_for_result(await manager.submit_request(request), 300)
            served[name] = result.engine
        await manager.stop()
        return served

    served = asyncio.run(run())
    assert served == {"long": labels["prefill-1"]["id"], "short": labels["decode-1"]["id"]}


def test_seed001_parallelism_routing_and_scenarios(seed_home):
    from sagellm_cli import (
        ControlPlaneManager,
        ExecutionInstance,
        ParallelismConfig,
        RequestMetadata,
        RequestPriority,
    )

    # 自动优化并行配置
    config = ParallelismConfig(
        auto_optimize=True,
        supported_strategies=["TP", "PP", "Hybrid"],
    )
    # 手动指定并行配置
    instance = ExecutionInstance(
        instance_id="hybrid-instance",
        tensor_parallel_size=4,  # TP=4
        pipeline_parallel_size=2,  # PP=2
        data_parallel_size=2,  # DP=2
        gpu_count=16,
    )
    manager = ControlPlaneManager(
        routing_strategy="affinity",  # 用户亲和性路由
    )
    # 场景 1: 使用 DP (数据并行) 提高吞吐
    manager = ControlPlaneManager(scheduling_policy="fifo")
    instance = ExecutionInstance(
        instance_id="batch-instance",
        data_parallel_size=4,
        gpu_count=4,
    )
    # 场景 2: 使用 SLO-Aware 调度 + PD 分离
    manager = ControlPlaneManager(
        scheduling_policy="slo_aware",
        enable_pd_separation=True,
    )
    # 场景 3: 使用 Priority 调度
    manager = ControlPlaneManager(scheduling_policy="priority")
    # 高优先级请求
    high_priority_request = RequestMetadata(
        priority=RequestPriority.CRITICAL,
        slo_deadline_ms=500,
    )
    # 低优先级请求
    low_priority_request = RequestMetadata(
        priority=RequestPriority.LOW,
    )
    # 场景 4: 使用 Cost-Optimized 调度
    manager = ControlPlaneManager(scheduling_policy="cost_optimized")
    # 设置成本预算
    request = RequestMetadata(
        cost_budget=0.01,  # 最多花费 $0.01
    )

    assert config.auto_optimize and instance.data_parallel_size == 4
    assert high_priority_request.priority.value == "critical"
    assert low_priority_request.slo_deadline_ms is None and request.cost_budget == 0.01
    assert manager.scheduling_policy == "cost_optimized"


def test_seed001_metrics_and_process_request(seed_home, capsys):
    from vllm.sampling_params import SamplingParams

    from sagellm_cli import ControlPlaneManager, ExecutionInstance

    async def main():
        # 创建控制平面管理器
        manager = ControlPlaneManager(
            scheduling_policy="adaptive",
            enable_pd_separation=True,
        )

        # 注册 vLLM 实例
        instance = ExecutionInstance(
            instance_id="llama-instance-1",
            host=HOST,
            port=PORT,
            model_name=MODEL,
            tensor_parallel_size=2,
            gpu_count=2,
        )
        manager.register_instance(instance)

        # 处理请求
        prompt = "Hello, how are you?"
        sampling_params = SamplingParams(
            temperature=0.7,
            top_p=0.9,
            max_tokens=512,
        )

        output = await manager.process_request(
            prompt=prompt,
            sampling_params=sampling_params,
        )

        print(f"Output: {output}")

        # 获取性能指标
        metrics = manager.get_metrics()
        print(f"吞吐: {metrics.throughput} req/s")
        print(f"平均延迟: {metrics.avg_latency} ms")

        # -- seed 001's metrics sample, on the same manager --
        metrics = manager.get_metrics()
        # 请求指标
        print(f"Total requests: {metrics.total_requests}")
        print(f"Completed: {metrics.completed_requests}")
        print(f"Active: {metrics.active_requests}")
        # 延迟指标
        print(f"Avg latency: {metrics.avg_latency_ms}ms")
        print(f"P95 latency: {metrics.p95_latency_ms}ms")
        print(f"P99 latency: {metrics.p99_latency_ms}ms")
        # 吞吐指标
        print(f"Tokens/sec: {metrics.tokens_per_second}")
        print(f"Requests/sec: {metrics.requests_per_second}")
        # SLO指标
        print(f"SLO violations: {metrics.slo_violations}")
        print(f"SLO compliance: {metrics.slo_compliance_rate:.2%}")
        # 资源指标
        print(f"GPU utilization: {metrics.avg_gpu_utilization:.2%}")
        return metrics

    metrics = asyncio.run(main())  # the seed never stops it: `seed_home` does
    out = capsys.readouterr().out
    assert "Output: " in out and "Total requests: 1" in out and "Completed: 1" in out
    assert "Active: 0" in out and "SLO violations: 0" in out
    assert "GPU utilization: 0.00%" in out  # no GPU here
    assert metrics.avg_latency_ms > 0 and metrics.tokens_per_second > 0


# -- seed 002 ------------------------------------------------------------------------


def test_seed002_integrate_with_sage_app(seed_home):
    import asyncio

    from sagellm_cli import (
        ControlPlaneManager,
        ExecutionInstance,
        RequestMetadata,
        RequestPriority,
    )

    async def integrate_with_sage_app():
        """SAGE 应用集成示例"""

        # 1. 初始化 Control Plane
        manager = ControlPlaneManager(
            scheduling_policy="adaptive",
            routing_strategy="load_balanced",
            enable_pd_separation=True,
            enable_monitoring=True,
        )

        # 2. 注册 vLLM 实例
        # 注意: vLLM 实例需要预先启动并监听 HTTP 端口

        # Prefilling 优化实例
        prefilling_instance = ExecutionInstance(
            instance_id="prefill-1",
            host=HOST,  # 或远程 IP
            port=PORT,
            model_name=MODEL,
            instance_type="prefilling",
            tensor_parallel_size=4,
            gpu_count=4,
        )
        manager.register_instance(prefilling_instance)

        # Decoding 优化实例
        decoding_instance = ExecutionInstance(
            instance_id="decode-1",
            host=HOST,
            port=PORT,
            model_name=MODEL,
            instance_type="decoding",
            tensor_parallel_size=1,
            gpu_count=1,
        )
        manager.register_instance(decoding_instance)

        # 3. 启动 Control Plane
        await manager.start()

        # 4. 在 SAGE 应用中提交请求
        request = RequestMetadata(
            request_id="sage-req-001",
            user_id="user-123",
            priority=RequestPriority.HIGH,
            slo_deadline_ms=1000,
            max_tokens=512,
            prompt="用简单的语言解释量子计算。",
        )

        request_id = await manager.submit_request(request)

        # 5. 等待完成并获取结果
        while True:
            status = await manager.get_request_status(request_id)
            if status.state in ["completed", "failed"]:
                break
            await asyncio.sleep(0.1)

        # 6. 获取性能指标
        metrics = manager.get_metrics()
        print(f"Throughput: {metrics.requests_per_second:.2f} req/s")
        print(f"Latency: {metrics.avg_latency_ms:.2f} ms")

        # 7. 停止 Control Plane
        await manager.stop()

        return status

    # 运行集成
    status = asyncio.run(integrate_with_sage_app())
    assert status.state == "completed" and status.error is None, status
    assert isinstance(status.output, str) and status.result.usage["completion_tokens"] > 0
    assert status.result.engine is not None


def test_seed002_llm_service(seed_home, capsys):
    import asyncio
    import logging

    from sagellm_cli import ControlPlaneManager, ExecutionInstance, RequestMetadata, RequestPriority

    logger = logging.getLogger(__name__)

    class LLMService:
        """SAGE LLM 服务，集成 Control Plane"""

        def __init__(self, config):
            self.config = config
            self.manager = None

        async def initialize(self):
            """初始化服务"""
            logger.info("Initializing LLM Service with Control Plane")

            # 创建 Control Plane
            self.manager = ControlPlaneManager(
                scheduling_policy=self.config.get("scheduling_policy", "adaptive"),
                enable_pd_separation=self.config.get("enable_pd_separation", True),
            )

            # 从配置加载 vLLM 实例
            for instance_config in self.config.get("vllm_instances", []):
                instance = ExecutionInstance(**instance_config)
                self.manager.register_instance(instance)

            # 启动
            await self.manager.start()
            logger.info("LLM Service initialized successfully")

        async def generate(self, prompt: str, **kwargs) -> str:
            """生成文本"""
            request = RequestMetadata(
                prompt=prompt,
                max_tokens=kwargs.get("max_tokens", 512),
                priority=kwargs.get("priority", RequestPriority.NORMAL),
            )

            request_id = await self.manager.submit_request(request)

            # 等待完成
            status = await self._wait_for_completion(request_id)

            if status.state == "completed":
                return status.output
            else:
                raise RuntimeError(f"Request failed: {status.error}")

        async def _wait_for_completion(self, request_id: str, timeout: float = 30.0):
            """等待请求完成"""
            import time

            start_time = time.time()

            while time.time() - start_time < timeout:
                status = await self.manager.get_request_status(request_id)
                if status.state in ["completed", "failed"]:
                    return status
                await asyncio.sleep(0.1)

            raise TimeoutError(f"Request {request_id} timed out")

        async def shutdown(self):
            """关闭服务"""
            if self.manager:
                await self.manager.stop()
            logger.info("LLM Service shutdown complete")

    # 使用示例
    async def main():
        config = {
            "scheduling_policy": "adaptive",
            "enable_pd_separation": True,
            "vllm_instances": [
                {
                    "instance_id": "vllm-1",
                    "host": HOST,
                    "port": PORT,
                    "model_name": MODEL,
                    "tensor_parallel_size": 2,
                }
            ],
        }

        service = LLMService(config)
        await service.initialize()

        try:
            output = await service.generate("Hello, how are you?")
            print(f"Output: {output}")
        finally:
            await service.shutdown()

    asyncio.run(main())
    assert "Output: " in capsys.readouterr().out
    assert _labels(seed_home) == {}


def test_seed002_configurations(seed_home):
    from sagellm_cli import (
        ControlPlaneManager,
        DecodingConfig,
        ExecutionInstance,
        ExecutionInstanceType,
        PDSeparationConfig,
        PrefillingConfig,
    )

    # 最简配置
    manager = ControlPlaneManager(scheduling_policy="fifo", enable_pd_separation=False)
    instance = ExecutionInstance(
        instance_id="vllm-1", host=HOST, port=PORT, model_name=MODEL,
        tensor_parallel_size=1, gpu_count=1,
    )  # fmt: skip
    manager.register_instance(instance)

    # 启用 PD 分离
    pd_config = PDSeparationConfig(
        enabled=True,
        routing_policy="adaptive",
        prefilling_threshold_input_tokens=2048,  # 超过 2048 tokens 视为 prefilling
    )
    manager = ControlPlaneManager(
        scheduling_policy="adaptive",
        enable_pd_separation=True,
        pd_config=pd_config,
    )
    # Prefilling 优化实例
    prefilling_instance = ExecutionInstance(
        instance_id="prefilling-1",
        host=HOST,
        port=PORT,
        model_name=MODEL,
        instance_type=ExecutionInstanceType.PREFILLING,
        tensor_parallel_size=8,  # 高 TP 以提高吞吐
        gpu_count=8,
        prefilling_config=PrefillingConfig(
            target_batch_size=64,
            tensor_parallel_size=8,
            enable_chunked_prefill=True,
        ),
    )
    # Decoding 优化实例
    decoding_instance = ExecutionInstance(
        instance_id="decoding-1",
        host=HOST,
        port=PORT,
        model_name=MODEL,
        instance_type=ExecutionInstanceType.DECODING,
        tensor_parallel_size=2,  # 低 TP 以降低延迟
        gpu_count=2,
        decoding_config=DecodingConfig(
            target_latency_ms=50,
            max_parallel_requests=200,
        ),
    )
    manager.register_instance(prefilling_instance)
    manager.register_instance(decoding_instance)
    assert manager.routing_strategy == "length"
    assert manager._options["length_threshold_tokens"] == 2048

    # 生产环境完整配置
    manager = ControlPlaneManager(
        scheduling_policy="adaptive",
        routing_strategy="affinity",  # 用户亲和性，提高缓存命中率
        enable_pd_separation=True,
        enable_monitoring=True,
        enable_auto_scaling=False,  # 目前不支持，未来版本
    )
    # 多个实例，不同并行策略
    instances = [
        # TP=4 实例 (高吞吐 prefilling)
        ExecutionInstance(
            instance_id="vllm-tp4", host=HOST, port=PORT, model_name=MODEL,
            tensor_parallel_size=4, gpu_count=4, instance_type="prefilling",
        ),
        # TP=2, PP=2 混合并行 (大模型)
        ExecutionInstance(
            instance_id="vllm-hybrid", host=HOST, port=PORT, model_name=MODEL,
            tensor_parallel_size=2, pipeline_parallel_size=2, gpu_count=4,
            instance_type="general",
        ),
        # DP=2 数据并行 (高并发 decoding)
        ExecutionInstance(
            instance_id="vllm-dp2", host=HOST, port=PORT, model_name=MODEL,
            data_parallel_size=2, tensor_parallel_size=2, gpu_count=4,
            instance_type="decoding",
        ),
    ]  # fmt: skip
    for instance in instances:
        manager.register_instance(instance)

    roles = {label: r["role"] for label, r in _labels(seed_home).items()}
    assert roles == {
        "vllm-1": "general", "prefilling-1": "prefill", "decoding-1": "decode",
        "vllm-tp4": "prefill", "vllm-hybrid": "general", "vllm-dp2": "decode",
    }  # fmt: skip


# -- seed 004 ------------------------------------------------------------------------


def test_seed004_unified_client(servers, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sage("llm", "serve", "--background", "--port", str(port), home=servers["home"],
         check=True, timeout=120)  # fmt: skip
    monkeypatch.setenv("SAGELLM_HOME", str(servers["home"]))

    from sagellm_cli import UnifiedInferenceClient

    # Create client (uses Control Plane with vLLM backend)
    client = UnifiedInferenceClient.create()

    # LLM inference
    response = client.chat([{"role": "user", "content": "Hello!"}])

    # Embedding
    vectors = client.embed(["text1", "text2"])

    assert isinstance(response, str) and client.base_url.endswith(f":{port}/v1")
    assert len(vectors) == 2 and len(vectors[0]) == 384
    client.close()
