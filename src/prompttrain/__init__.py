"""Agent Prompt Train: a proxy and dashboard for the Anthropic Claude API."""

__version__ = "0.1.0"
