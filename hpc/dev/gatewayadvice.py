"""What a user should do about each gateway error code: the advice column of
docs/troubleshooting.md (``hpc.dev.troubledocs`` refuses a code without an entry here)."""

from __future__ import annotations

# What a client (or the admin reading the gateway's log) should do about each gateway code.
GATEWAY_ADVICE: dict[str, str] = {
    "invalid_json": "Send a JSON body (`Content-Type: application/json`); check the quoting "
    "of `curl -d`.",
    "invalid_body": 'The body must be a JSON object such as `{"model": ..., "messages": '
    "[...]}`, not a list or a string.",
    "missing_model": 'Add `"model"`: one of the names `GET /v1/models` lists.',
    "malformed_request": "The request is not valid HTTP/1.1 (a bad request line or header, "
    "`Content-Length` together with `Transfer-Encoding`, bad chunked encoding): fix the "
    "client, or the proxy in front of the gateway that rewrites requests.",
    "header_too_large": "A request line or header is over 8 KiB, or there are over 128 "
    "headers: send fewer or shorter ones (a large cookie or token?); images go in the body.",
    "invalid_api_key": "Send `Authorization: Bearer <key>` (or `x-api-key: <key>`, as "
    "Anthropic's clients do) with a key from `mt keys create`; an expired or revoked key is "
    "refused too (`mt keys list`).",
    "previous_response_not_found": "The replica that holds that response has stopped, or "
    "another key made it: start the conversation again with its whole input (no "
    "`previous_response_id`).",
    "model_not_allowed": "The key's allow-list excludes this model; ask for a key with "
    "`mt keys create NAME --model 'GLOB'`.",
    "model_not_found": "Use a name from `GET /v1/models` (or `mt models`); add the model to "
    "models.yaml or `mt submit` it.",
    "not_found": "The gateway serves `/v1/models`, `/v1/chat/completions`, `/v1/completions`, "
    "`/v1/embeddings`, `/v1/responses`, `/v1/messages`, `/tokenize`, `/healthz`, `/metrics` "
    "(docs/gateway.md lists them all); check the base URL (OpenAI's clients: ending in `/v1`; "
    "Anthropic's: without it).",
    "method_not_allowed": "Use GET for `/v1/models` and POST for completions and embeddings.",
    "request_too_large": "Send a smaller request (shorter prompt, fewer messages), or raise "
    "the gateway's `--max-body-mb` (large base64 images).",
    "request_timeout": "The body came too slowly: check the client's network (or a proxy "
    "that buffers uploads); the gateway waits `--body-timeout` for a whole body.",
    "rate_limit_requests": "Wait `Retry-After` seconds; the key's `--rpm` limit is reached.",
    "rate_limit_tokens": "Wait `Retry-After` seconds; the key's `--tpm` limit is reached.",
    "on_demand_starting": "The model's on-demand job is still queued or starting: retry "
    "after `Retry-After` (streaming requests wait with keep-alives instead); `mt pool status` "
    "shows the job and Slurm's pending reason.",
    "on_demand_start_failed": "The gateway could not start the model's job (the message has "
    "the scheduler's reason and the log's last lines); fix the model's entry in models.yaml "
    "(partition, resources); the gateway retries only after its back-off.",
    "on_demand_at_capacity": "The gateway already runs `--max-on-demand-jobs` on-demand jobs: "
    "retry later, or cancel an idle one (`mt pool status`, `mt cancel JOB`).",
    "on_demand_key_limit": "Your key may start only `max_on_demand_jobs` jobs at once "
    "(keys.yaml); wait for one to go idle, or ask the admin for a higher limit.",
    "gateway_shutting_down": "The gateway was stopped (SIGTERM) and its grace period ended "
    "before this request was answered: retry after `Retry-After` (a restarted gateway, or "
    "another one, answers it); a stream cut this way ends with this error and no `[DONE]`.",
    "internal_error": "A gateway bug: the gateway's log has the traceback; please report it.",
    "upstream_error": "The engine answered with an error or broke off; `mt logs JOB` shows "
    "its log.",
    "no_ready_endpoint": "The model is configured but no job serves it: `mt submit MODEL "
    "--wait`, or wait for the starting one (`mt status`).",
    "upstream_unavailable": "The engine did not answer: `mt status` (is the job still "
    "running?) and `mt logs JOB`; the gateway retries another endpoint when there is one.",
    "model_at_capacity": "Too many requests at once for this model "
    "(`--max-in-flight-per-model`); retry after `Retry-After`, or serve a second replica.",
    "gateway_at_capacity": "Too many requests at once in all (`--max-in-flight`); retry "
    "after `Retry-After`.",
    "connection_limit": "The gateway has `--max-connections` client connections open (by "
    "default what its open-file limit allows): retry after `Retry-After`; the admin raises "
    "the limit (`ulimit -n`) or finds who holds idle connections (`mt_gateway_connections_open`).",
    "client_connection_limit": "Your address has `--max-connections-per-client` connections "
    "open (a quarter of the total by default): close idle ones (one client with a connection "
    "pool, not one per request) and retry after `Retry-After`; behind a reverse proxy on "
    "another host, the admin raises the cap or passes 0.",
    "upstream_connect_timeout": "The engine's node did not accept the connection in "
    "`--connect-timeout`: check the job's node is reachable from the gateway's host.",
    "upstream_first_token_timeout": "The engine took longer than `--first-token-timeout` to "
    "start answering: a long prompt on a busy engine; raise the timeout or add replicas.",
    "upstream_idle_timeout": "The engine went silent mid-stream for `--idle-timeout`: "
    "`mt logs JOB` (out of memory? preempted?).",
}
