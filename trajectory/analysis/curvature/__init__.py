"""Curvature of the loss along a trajectory: Hessian-vector products and the estimators built on them."""
