"""Classifier unlearning: the model and its target (model.py), IAU and SalUn, and the measures results report."""
