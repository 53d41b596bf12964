"""Evaluation for Astrea: metrics of the paper's task families (`astrea.evaluation.metrics`)."""
