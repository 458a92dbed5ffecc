"""InfoNoise-EDM: noise-level samplers, profiles and sigma-grids (Raya et al., InfoNoise)."""
