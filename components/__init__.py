"""KFP v2 components of MetaRec, one folder each (component.py, component.yaml, README.md, metadata.yaml,
tests/); build.py compiles them, common.py and kube.py hold what their bodies share."""
