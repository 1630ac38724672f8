"""The web dashboard: server-rendered pages (Jinja2), a small script for live parts, inline SVG charts.

`mount(app)` adds the pages and `/static` to the fleet manager's FastAPI app; docs/dashboard.md.
"""

from fleet_manager.web.routes import mount, router

__all__ = ["mount", "router"]
