"""MetaRec: meta-learned recommenders that adapt to a new user from a handful of ratings.

The core package is framework-neutral: Kubeflow components (``metarec.components``), pipelines
(``metarec.pipelines``) and the TorchServe handler (``metarec.serving``) all call into it.
"""

__version__ = "0.1.0"
