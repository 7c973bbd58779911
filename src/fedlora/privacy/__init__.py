"""Differential privacy: the accountant and the Gaussian mechanism over client updates (DP-FedAvg)."""
