"""What runs on the compute node.

The job wrapper, its plan and record, engines and their load, the drain, the swap pool and
its slots, the process tree, the node probe. Nothing here imports login-node or laptop code
(the CLI, SSH, Slurm).
"""
