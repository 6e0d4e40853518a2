"""Evaluation like the ArtAug paper's table: prompt sets, statistics, scoring, report."""
