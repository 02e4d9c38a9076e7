"""Layer 2, models: the ViT backbone and ToCo's network, on which every method builds. Uses: core, data."""
