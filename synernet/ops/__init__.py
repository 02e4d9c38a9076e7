"""Layer 3, ops: tensor functions without training state (CAMs, PAR, losses, metrics, inference and CRF, Gaussian
correction, SynerNet's branch operations and confidence matrix). Uses: core, data, models."""
