"""Everything that knows about ranks: planner and constraints, ``DistributedModelParallel``
wrapping, fused optimizers, sharded checkpoints and plan dry-runs. Arrives with the sharded
training issue; nothing else in the project imports process-group code."""
