"""One module per op: reference, validation, torch.library registration and backend dispatch."""
