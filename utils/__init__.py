"""Settings and steps, losses and targets, the training loop and the engine that advances chains,
checkpoints, leases and the results store, recipes and reports, the theory model and its outputs
(README "Layout" names each module's one job)."""
