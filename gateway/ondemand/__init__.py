"""On-demand models: jobs started when a request asks for their model, stopped when idle."""
