"""Load tests for OpenAI-compatible servers: ``python -m loadtest`` (docs/loadtest.md)."""
