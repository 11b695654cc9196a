"""Stored images and the Attentive Eraser: collections, masks, the attention redirection, the demo recipe."""
