"""Layer 0 of the load tester: the run's config, workloads (prompts, sessions, datasets,
traces), arrival shapes, the OpenAI client, the runner and the result documents. Imports
nothing else from ``loadtest``."""
