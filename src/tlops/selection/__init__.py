"""Choosing what a run does: backbone ranking (``ranking``), task similarity, feature drift, and the validate
step's planner that calls them (``planner``)."""
