"""Routing statistics of a trace (`stats`) and their heatmaps (`figures`)."""
