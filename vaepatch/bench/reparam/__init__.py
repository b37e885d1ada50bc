"""Dehaene & Brossard at CPU scale, one paper table a module: where each KL stops being finite
(``numerics``, Table 1), overfitting with a learned decoder scale (``overfit``, Table 2), learning the
decoder's variance (``decoder_variance``, Table 3)."""
