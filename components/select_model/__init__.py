"""KFP component: select_model (see README.md)."""
