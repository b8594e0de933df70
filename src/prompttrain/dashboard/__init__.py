"""The dashboard service (port 3001)."""
