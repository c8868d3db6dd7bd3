"""torch.distributed: the process context, collectives, DDP/FSDP strategies."""
