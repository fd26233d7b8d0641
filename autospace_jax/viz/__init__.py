"""Figures: cell drawings and the stages' plots."""
