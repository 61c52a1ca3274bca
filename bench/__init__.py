"""Load generation and benchmark reports (issue 6: not built yet)."""
