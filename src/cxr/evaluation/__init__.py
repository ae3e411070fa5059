"""Evaluation: metrics at a chosen threshold, curves and figures."""
