"""Base models: the built-in model cache and loading of local model directories."""
