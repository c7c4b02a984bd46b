"""Health, metrics and the OpenAPI document (`router.py`)."""
