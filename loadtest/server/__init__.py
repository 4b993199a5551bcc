"""Layer 1: what the load tester reads from the server: ``/metrics`` scrapes, the saturation
rule on them, the join of each request's figures (``/v1/requests/{id}/metrics``), and the
``ObservedRunner`` that does both around the core runner. Imports only ``loadtest.core``."""
