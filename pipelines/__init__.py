"""KFP pipeline definitions (metarec_pipeline), compile entry point, run configs and the kfp.local runner."""
