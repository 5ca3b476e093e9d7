"""Explanations: one-pass feature maps and Grad-CAM for every conv layer, their measures and plots."""
