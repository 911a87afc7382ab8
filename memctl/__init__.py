"""memctl: experiments with differentiable-memory neural networks."""

__version__ = "0.1.0"
