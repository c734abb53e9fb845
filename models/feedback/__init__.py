"""Human-preference feedback: the pool, simulated annotators, preference and
rich-feedback models."""
