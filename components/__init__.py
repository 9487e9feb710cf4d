"""KFP v2 components of MetaRec, one folder each (component.py, component.yaml, README.md); build.py compiles them."""
