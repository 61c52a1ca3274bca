"""SSH for the CLI and the tunnels.

``target`` (ssh_config, ProxyJump), ``hostkeys`` (known_hosts), ``auth`` (keys, then
prompts), ``connection`` (one paramiko link through its hops), ``exec`` (commands on it:
the Transport for `mt --host`), ``failures`` (paramiko's errors as hpc.errors).
"""
