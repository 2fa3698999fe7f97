"""GPU benchmarks of the course's recipes; see benchmarks/README.md."""
