"""The HTTP API (FastAPI): schemas, authentication, error mapping to problem+json."""
