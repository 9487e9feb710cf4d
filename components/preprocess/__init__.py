"""KFP component: preprocess (see README.md)."""
