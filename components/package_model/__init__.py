"""KFP component: package_model (see README.md)."""
