"""The worker: owns the model and the KV tensors, turns a SchedulerOutput into sampled tokens."""
