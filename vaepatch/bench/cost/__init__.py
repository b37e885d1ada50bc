"""What the patch costs a training step, across the upstreams: ``activation_memory``."""
