"""Pervez & Gavves at CPU scale: does the OU-smoothed prior keep the top layers alive (``collapse``), and
where is the phase transition in rho (``phase``)? Both train the MLP hierarchy through ``jobs``."""
