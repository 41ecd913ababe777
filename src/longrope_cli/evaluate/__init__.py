"""Perplexity and passkey evaluation."""
