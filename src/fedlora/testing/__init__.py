"""What tests and benchmarks use to hurt the system on purpose: failpoints and synthetic clients."""
