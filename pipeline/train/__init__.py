"""The training loop and its state: accumulation, checkpoints, topology, optimizer, preemption, metrics, report."""
