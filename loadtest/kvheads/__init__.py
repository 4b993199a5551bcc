"""The KV-heads experiment (a package): MHA, GQA and MQA variants of one model under the same KV
byte budget and the same load sweep (``python -m loadtest kv-heads``).

Managed mode (the default) starts the gateway (``python -m service serve``) for each
variant in turn on a free loopback port, waits for ``/health/ready``, runs the sweep,
and stops it with SIGTERM; never two engines at once. Targets mode
(``--targets name=url,...``) drives servers that are already running, e.g. one per GPU
model, and reads their cache shape from ``/metrics``.

The same bytes for every variant
    ``num_gpu_blocks_override`` counts blocks, so each variant's block count comes from
    its KV bytes per block: budget B bytes -> ``B // (block_size x KV bytes per token)``
    blocks (``service.kv.planner.plan``). vLLM v1 also takes one block of the pool as its
    *null block* (a placeholder that never holds KV), so the engine is given
    ``blocks + reserved_blocks``: the usable bytes are then equal across variants.

The prediction
    A sequence of P prompt and G generated tokens ends holding T = P + G - 1 tokens of
    KV (service/kv/geometry.py), i.e. ceil(T / block_size) blocks; vLLM admits a request
    when the blocks of its prompt are free and grows it while it decodes. With
    ceil(P / block_size) == ceil(T / block_size) a sequence never grows past its
    admission, so the running batch under saturation is exactly
    ``floor(usable blocks / blocks per sequence)``, with no preemption. Otherwise the
    scheduler over-admits and preempts (it admits by prompt), and the sustained batch sits near
    the prediction with higher peaks.

The measurement
    The sustained running batch under saturation: the median (and mode) of
    ``gateway_requests_running`` over the scrapes that saw waiting requests, pooled over
    the *saturated* steps of a variant, i.e. the steps where at least
    ``saturation_fraction`` of the scrapes taken during the step saw a non-empty queue
    (a closed loop below capacity only queues for an instant between a request's end
    and its successor's admission). Peaks and preemptions are reported beside it.

Modules: ``spec`` (the YAML spec), ``plan`` (budget -> blocks -> prediction, pure),
``measure`` (the measured capacity, pure; the rule itself is ``loadtest.server.saturation``),
``result`` (the JSON document), ``procs`` (gateway processes and other engines on the
machine), ``run`` (the sweeps), ``cli``, ``report`` and ``explain`` (Markdown; the prose
is in ``templates/report.md``, loaded by ``prose``), ``gpu`` (planner tables of published
models), ``plots``; the latency sweep (``--latency``): ``latency`` (its spec, the context grid,
the roofline prediction and residuals, pure), ``latency_run`` (gateways and points),
``latency_report`` (rows, fits, PNG, the report's latency section), ``latency_cli``. This
``__init__`` imports none of them.

Result: one JSON document (:class:`KvHeadsResult`, one ``loadtest`` RunResult per
variant inside), from which ``--report-only RESULT.json`` rebuilds the Markdown and PNGs.
"""
