"""What the patch and OU smoothing cost a training step: bytes held for backward (``activation_memory``),
OU's step time and memory (``ou_smoothing``), and the helpers every cost bench measures with
(``timing``: configurations interleaved side by side; ``measure``: FLOPs, saved bytes, RSS)."""
