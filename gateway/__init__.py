"""The OpenAI-compatible gateway that routes by model name to healthy endpoints."""
