"""Monitoring of deployed models: payload logs, drift, triggers and the closed loop."""
