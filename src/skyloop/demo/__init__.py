"""`skyloop demo`: the closed loop end to end on one machine (train, deploy, drift, retrain, gate, canary)."""
