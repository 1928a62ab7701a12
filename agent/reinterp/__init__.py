"""Reinterpretation: signal acceptance, injection-recovery and sensitivity on a finished run."""
