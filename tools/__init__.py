"""Small command-line tools around a training run (python -m tools.NAME); they read run directories and import
nothing from the training pipeline."""
