"""Shared helpers of every stage: config base classes and presets (`config`), the learning-rate schedule
(`schedule`), and small host utilities (`system`). Imports nothing from a stage package."""
