"""Small shared helpers: atomic file writes, terminal tables, process-group collectives."""
