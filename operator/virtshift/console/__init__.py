"""Terminal and report views for people: virtshift plan, status and report (read-only)."""
