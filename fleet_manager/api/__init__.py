"""The fleet manager's HTTP API (FastAPI): `create_app(service)` in `main`."""
