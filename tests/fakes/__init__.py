"""Real stand-ins for external systems (LLM providers) that tests and benchmarks run against."""
