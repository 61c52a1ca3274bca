"""SSH for the CLI and the tunnels.

Targets (ssh_config, ProxyJump), host keys, auth, one paramiko connection, remote exec.
"""
