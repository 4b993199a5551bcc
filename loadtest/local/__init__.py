"""Layer 3: processes on this machine: the server-process owner (``servers``: start a gateway
or ``vllm serve``, wait until ready, stop) and the fake OpenAI server for tests."""
