"""Model: the VGG network of generated layers, its node kinds, workspace, optimizer driver, training step and checkpoints."""
