"""Training components: networks, losses, datasets, augmentation and the training loop (EDM, Karras et al. 2022)."""
