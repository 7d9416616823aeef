"""Measurement scripts: throughput, loader memory and speed, start-up, mask cache speed, modules per step."""
