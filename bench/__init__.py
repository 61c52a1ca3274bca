"""Load generation and benchmark reports: `mt bench` sweeps, the gateway-overhead run, and
the Slurm start-up / status benchmarks (see docs/benchmarks.md)."""
