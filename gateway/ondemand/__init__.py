"""On-demand models: start a model's job when a request asks for it, cancel it when idle.

A model with ``on_demand:`` in ``models.yaml`` and no ready endpoint makes the gateway submit
its job through the configured backend, once per burst however many requests arrive: the
check-and-start runs on the event loop without awaiting in between, so the first request
creates the one submit task and every later one joins it. Backend calls block (sbatch, a
Kubernetes API call, squeue), so each runs in a worker thread; the event loop only waits.

While the job is pending or starting, a streaming request already has its 200 and gets an
SSE comment (``: pending (Priority)``, ``: starting``) every ``on_demand_keepalive_s`` and
on every change, so proxies and clients keep the connection; then the engine's answer is
relayed into the same response. A non-streaming request waits up to the model's
``start_deadline_s`` and then gets 503 + Retry-After with the state in the message.

A failed start (sbatch refuses a partition, the job fails before it is healthy) answers
every waiting request with the reason (503, or an in-band ``data: {"error": …}`` event with
no ``[DONE]`` on a stream already started) and is remembered for
``on_demand_failure_backoff_s``: requests in that time get the same answer and nothing is
resubmitted, so a bad spec never turns into a loop of submits.

A monitor task reads the records of the gateway's own jobs every ``on_demand_poll_s`` (and
asks the scheduler, batched, every few seconds for the pending reason and for jobs that
ended without finishing their record), cancels jobs whose model has had no request for
``idle_ttl_s`` with nothing in flight, and publishes the state file `mt pool status` reads.
The gateway cancels only jobs whose record says it started them (``started_by``), and finds
them again after a restart by that field.

Scale out: when the model's requests in flight (waiting ones included) exceed
``target_in_flight`` per ready replica, a request (or the monitor, for load that stays)
starts one more job, up to ``max_replicas``; only one start per model is ever on its way.
Requests keep going to the ready replicas; the new one joins them when its record is
ready. Scale in: a replica beyond the oldest that has had no request for ``idle_ttl_s``,
with none in flight to it, is cancelled, most recently started first; the last one follows
the model's idle rule above.
"""
