"""KFP component: meta_train (see README.md)."""
