"""Vision: the backbone catalogue, its stages, preprocessing as data, the parity checks and the feature cache."""
