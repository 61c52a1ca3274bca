"""SSH tunnels from a laptop to the login-node gateway: one interface, two engines.

``tunnels.engine.TunnelEngine`` is the interface; ``tunnels.openssh`` runs the system's
``ssh -N -L`` and ``tunnels.pyforward`` is a pure-Python (paramiko) forwarder that reuses
hpc.sshexec's connection, ssh-config resolution and strict host-key checking.
"""
