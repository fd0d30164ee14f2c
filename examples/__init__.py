"""Apps built only on wsapp's public API (`from wsapp import ...`), runnable from the repository root."""
