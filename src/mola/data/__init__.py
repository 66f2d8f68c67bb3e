"""Training data: built-in tasks, user files, prompt templates and encoding."""
