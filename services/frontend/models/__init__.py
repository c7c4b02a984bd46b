"""The models endpoint (`router.py`)."""
