"""The HTTP API: SGLang's native routes, OpenAI's, Prometheus; ``create_app`` in ``server.app``."""

__version__ = "0.1.0"
