"""Evaluation: log-likelihood and generation scoring, metrics."""
