"""The chaos soak: clients stream through the gateway while faults are injected.

    python -m bench.chaos --minutes 60 --backends local,slurm --private-cluster

For each backend (the local backend and the private Slurm cluster), one "world": its own
``$MT_HOME`` with the registry on a small tmpfs (root), the real Gemma 3 270M GGUF served
by llama.cpp as an on-demand model, and a real ``mt gateway`` on a fixed loopback port.
Client threads send streaming and non-streaming chat requests continuously; every
``--fault-interval`` seconds one fault is injected, taking turns:

- ``engine-kill``    SIGKILL the engine of a ready job
- ``engine-stop``    SIGSTOP the engine for ``--hold`` seconds, then SIGCONT
- ``wrapper-kill``   SIGKILL the job wrapper (the engine must not outlive it)
- ``gateway-restart`` SIGTERM the gateway, start a new one on the same port
- ``requeue``        ``scontrol requeue`` the job (Slurm only)
- ``disk-full``      fill the registry's filesystem for ``--hold`` seconds, then free it
- ``tunnel-drop``    kill the sshd sessions under the world's ``mt tunnel`` (the link drops)

Each world also runs a real sshd on loopback (tests/sshd.py) and one foreground ``mt
tunnel`` to its gateway (OpenSSH for the first world, paramiko for the second), through
which one more client streams.

At the end the clients stop, the gateway is left running until its on-demand jobs are
idle-cancelled, then stopped, and ``mt status`` settles the records. The report counts:
requests sent; whole answers; clean errors (OpenAI-shaped, by status or in-band); refused
connections while the gateway was down; cut ones (the connection broke and the client's
HTTP library says so: only a dropped tunnel may do that); hung requests (no byte for
longer than ``--hung``); lost ones (anything else); duplicate jobs per model; processes left
running; records left in a non-final state; per-job keys found in process arguments or in
logs; and the longest stretch with no whole answer (every fault must be recovered from,
not just reported). Every one of hung, lost, duplicates, leftovers, non-final records and
keys must be 0, and the longest outage under ``--max-outage``.
"""
