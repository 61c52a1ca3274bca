"""`mt doctor`: checks of this machine and of a compute node (through a probe job)."""
