"""The attention replica: continuous-batching engine, scheduler, sampling and tokenization."""
