"""Wiring only: observers, scheduler jobs, threads, signals, sd_notify."""
