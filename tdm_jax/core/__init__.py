"""The TDM method: losses, schedules, samplers, LoRA, optimisers, draws, teacher pretraining, the distillation loop."""
