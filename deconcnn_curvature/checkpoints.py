"""Loading checkpoints into curvature problems — being built."""
