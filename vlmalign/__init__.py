"""vlmalign: align video LLMs with AI feedback."""

__version__ = "0.1.0"
