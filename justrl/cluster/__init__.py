"""The cluster side: placement, running in a Slurm allocation, preflight checks, process groups, requeue, the run lock."""
