"""Layer 4: benchmarks built on the layers below: compare (gateway vs vllm serve), soak,
the fleet and its benchmarks, hwprobe, the client's selftest and the GuideLLM / vLLM
cross-checks. The KV-heads experiment (``loadtest.kvheads``) sits on the same layer."""
