"""The fedge coordinator service (FastAPI + SQLAlchemy)."""

__version__ = "0.1.0"
