"""SSH tunnels from a laptop to the login-node gateway: one interface, two engines.

``tunnels.base.TunnelEngine`` is the interface and ``tunnels.engines`` the registry;
``tunnels.openssh`` runs the system's ``ssh -N -L`` and ``tunnels.pyforward`` is a
pure-Python (paramiko) forwarder on hpc.ssh.connection's link (ssh-config resolution,
ProxyJump, strict host-key checking). ``tunnels.supervisor`` keeps one up for `mt tunnel`.
"""
