"""SSH tunnels from a laptop to the login-node gateway (issue 4: not built yet)."""
