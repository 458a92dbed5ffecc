"""Evaluation: FID/FD feature detectors, the Fréchet distance, the FD-MNIST and FD-ARS (DNA) detectors trained here
with their training scripts, and exact sequence statistics. Used by fid.py and bench/; the training pipeline
(training/, torch_utils/, dnnlib/, infonoise/) never imports it."""
