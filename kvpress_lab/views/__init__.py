"""Views of a run's results: self-contained HTML pages showing which context tokens were kept."""

from kvpress_lab.views.retention import (
    render_retention_html,
    write_compare_pages,
    write_retention_html,
)

__all__ = ["render_retention_html", "write_compare_pages", "write_retention_html"]
