"""The gateway's hot path: an OpenAI request forwarded to an upstream that serves its model."""
