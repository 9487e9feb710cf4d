"""KFP component: meta_train_pytorchjob (see README.md)."""
