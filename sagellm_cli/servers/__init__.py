"""Servers that `sage llm engine start` spawns as engine processes."""
