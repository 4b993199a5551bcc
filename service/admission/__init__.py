"""Admission on predicted KV demand with a fair queue per tenant (docs/architecture.md)."""
