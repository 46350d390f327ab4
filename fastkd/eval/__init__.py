"""k-NN and linear-probe evaluation of frozen features."""
