"""Evaluation on the held-out split through the serving predictor, the champion comparison and its report."""
