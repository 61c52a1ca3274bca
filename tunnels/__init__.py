"""SSH tunnels from a laptop to the login-node gateway: one interface, two engines.

``tunnels.engines.TunnelEngine`` is the interface; ``tunnels.openssh`` runs the system's
``ssh -N -L`` and ``tunnels.pyforward`` is a pure-Python (paramiko) forwarder that reuses
hpc.ssh.exec's connection, ssh-config resolution and strict host-key checking.
"""
