"""Layer 4, engine: the `Method` contract, the add-on hook points, the `Learner` (loop, checkpoints, DDP, validation),
runs and the command line's parts. Uses: core, data, models, ops."""
