"""Model: the VGG network of generated layers, its workspace, optimizer driver, training step and checkpoints."""
