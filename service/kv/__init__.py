"""Pure KV-cache arithmetic: geometry, capacity planner (no vLLM import, so the load tester can use it)."""
