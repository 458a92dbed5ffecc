"""PyTorch utilities: distributed set-up, training statistics, persistence and misc helpers."""
