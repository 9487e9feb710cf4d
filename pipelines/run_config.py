"""Run configuration: one YAML file with a section per step, turned into pipeline arguments.

```yaml
methods: [maml, fomaml, reptile]   # meta-learners trained side by side
preprocess: {...}                  # metarec.preprocessing.DEFAULTS keys
train: {...}                       # metarec.training.DEFAULTS keys
evaluate: {...}                    # metarec.evaluation.DEFAULTS keys
select: {metric: ndcg@3, scenario: user_cold, fail_if_worse: false}
package: {model_name: metarec, output_uri: "", publish_if_worse: false, serving: {...}}   # serving: metarec.packaging settings
```

``metarec run-local`` starts from the shipped ``run-local.yaml`` and merges a user file on top, section
by section (a key given in the user file replaces the shipped one).
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from metarec.selection import SelectSettings

STEP_SECTIONS = {
    "preprocess": "metarec.preprocessing",
    "train": "metarec.training",
    "evaluate": "metarec.evaluation",
}
# The settings class each step builds from its section (the step checks values with it again).
STEP_SETTINGS = {
    "preprocess": "PreprocessSettings",
    "train": "TrainSettings",
    "evaluate": "EvaluateSettings",
}
SELECT_DEFAULTS = SelectSettings().to_dict()
PACKAGE_DEFAULTS = {"model_name": "metarec", "output_uri": "", "publish_if_worse": False, "serving": {}}
TOP_LEVEL_KEYS = ("methods", *STEP_SECTIONS, "select", "package")
KNOWN_METHODS = ("maml", "fomaml", "reptile")


def shipped_config_path(name: str) -> Path:
    """Returns the path of a run config shipped in ``metarec/configs/runs`` (``run-local``, ``tiny``).

    Args:
        name: Config name without ``.yaml``.
    """
    import metarec

    return Path(metarec.__file__).resolve().parent / "configs" / "runs" / f"{name}.yaml"


class _RunConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a number, as YAML 1.2 and JSON do.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-3``): ``inner_lr: 1e-3`` would reach the
    training step as the string ``"1e-3"`` and fail there.
    """


_RunConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml_mapping(path: str | Path) -> dict:
    """Reads a YAML file whose top level is a mapping.

    Args:
        path: File path.

    Returns:
        The mapping (empty for an empty file).

    Raises:
        ValueError: Missing file, invalid YAML or a top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"run config {path}: no such file")
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_RunConfigLoader)  # noqa: S506
    except yaml.YAMLError as error:
        raise ValueError(f"run config {path}: invalid YAML: {error}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ValueError(
            f"run config {path}: the top level must be a mapping of sections, got {type(document).__name__}"
        )
    return document


def merge_run_configs(base: dict, override: dict) -> dict:
    """Merges ``override`` into ``base`` one section deep.

    Args:
        base: Base run config (not modified).
        override: Run config whose section keys replace the base's.

    Returns:
        The merged config.
    """
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _step_module(section: str):
    """The step's module, or None when it cannot be imported here (e.g. no torch on a submitting host)."""
    try:
        return importlib.import_module(STEP_SECTIONS[section])
    except ImportError:
        return None


def _step_defaults(section: str) -> dict | None:
    """The DEFAULTS dict of a step module, or None when the module or dict is not available."""
    defaults = getattr(_step_module(section), "DEFAULTS", None)
    return defaults if isinstance(defaults, dict) else None


def _check_settings(settings_class, values: dict, source: str, section: str):
    """Builds a step's settings as the step will, so that a bad value or nested key fails here.

    Returns:
        The settings, or None when ``settings_class`` is None (its module is not importable).
    """
    if settings_class is None:
        return None
    try:
        return settings_class.from_dict(values)
    except ValueError as error:
        raise ValueError(f"{source}: section '{section}': {error}") from None


def _check_select(result: dict, evaluate, source: str) -> None:
    """The select step must find its metric and scenario in the evaluation the run config asks for.

    Otherwise select-model fails, or compares missing scores, only after every model was trained.
    """
    from metarec.selection import VALIDATION_OF, SelectSettings

    select = _check_settings(SelectSettings, result["select"], source, "select")
    if select.scenario not in VALIDATION_OF:
        raise ValueError(
            f"{source}: select.scenario {select.scenario!r} is not a scenario; known: {list(VALIDATION_OF)}"
        )
    if evaluate is None:
        return
    if select.scenario not in evaluate.scenarios:
        raise ValueError(
            f"{source}: select.scenario {select.scenario!r} is not evaluated (evaluate.scenarios: "
            f"{list(evaluate.scenarios)})"
        )
    if select.metric.startswith("ndcg@"):
        cutoff = select.metric.removeprefix("ndcg@")
        if not cutoff.isdigit() or int(cutoff) not in evaluate.ndcg_ks:
            raise ValueError(
                f"{source}: select.metric {select.metric!r} is not computed (evaluate.ndcg_ks: "
                f"{list(evaluate.ndcg_ks)})"
            )


def _check_package(package: dict, source: str) -> None:
    """The package step's model name and serving settings, checked before any step runs."""
    from metarec.serving_settings import ServingSettings, check_model_name

    try:
        check_model_name(package["model_name"])  # as metarec.packaging.build_archive checks it
    except ValueError as error:
        raise ValueError(f"{source}: package.{error}") from None
    if not isinstance(package["output_uri"], str):
        raise ValueError(f"{source}: package.output_uri must be a string, got {package['output_uri']!r}")
    _check_settings(ServingSettings, package["serving"], source, "package.serving")


def validate_run_config(config: dict, source: str = "run config") -> dict:
    """Checks sections and keys, and fills the select / package defaults.

    Step sections are checked against the step module's ``DEFAULTS`` keys and built into the step's
    settings (values, nested keys such as ``package.serving`` or the evaluate grids), the select metric and
    scenario against what evaluate computes, so that a mistake fails before any step runs rather than
    after training (the step functions check values again).

    Args:
        config: Run config as read from YAML.
        source: Name used in error messages (the file).

    Returns:
        A complete config: every section present, ``methods`` a non-empty list of unique names.

    Raises:
        ValueError: Unknown section or key, wrong type or value, unknown or repeated method, a select
            metric or scenario the evaluation does not compute.
    """
    unknown = sorted(set(config) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; known: {list(TOP_LEVEL_KEYS)}")
    result = {"methods": config.get("methods", list(KNOWN_METHODS))}
    methods = result["methods"]
    if isinstance(methods, str):
        methods = [name.strip() for name in methods.split(",") if name.strip()]
    if not isinstance(methods, list) or not methods:
        raise ValueError(f"{source}: 'methods' must be a non-empty list, e.g. [maml, fomaml, reptile]")
    bad = [name for name in methods if name not in KNOWN_METHODS]
    if bad:
        raise ValueError(f"{source}: unknown method(s) {bad}; known: {list(KNOWN_METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"{source}: 'methods' lists a method twice: {methods}")
    result["methods"] = list(methods)

    evaluate = None  # the evaluate settings, when metarec.evaluation is importable here
    for section in STEP_SECTIONS:
        values = config.get(section) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section '{section}' must be a mapping, got {type(values).__name__}")
        defaults = _step_defaults(section)
        if defaults is not None:
            typos = sorted(set(values) - set(defaults))
            if typos:
                raise ValueError(
                    f"{source}: unknown key(s) {typos} in section '{section}'; known: {sorted(defaults)}"
                )
        module = _step_module(section)
        settings = _check_settings(getattr(module, STEP_SETTINGS[section], None), values, source, section)
        if section == "evaluate":
            evaluate = settings
        result[section] = dict(values)

    for section, defaults in (("select", SELECT_DEFAULTS), ("package", PACKAGE_DEFAULTS)):
        values = config.get(section) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section '{section}' must be a mapping, got {type(values).__name__}")
        typos = sorted(set(values) - set(defaults))
        if typos:
            raise ValueError(
                f"{source}: unknown key(s) {typos} in section '{section}'; known: {sorted(defaults)}"
            )
        result[section] = {**copy.deepcopy(defaults), **values}
    for section, key in (("select", "fail_if_worse"), ("package", "publish_if_worse")):
        if not isinstance(result[section][key], bool):
            raise ValueError(f"{source}: {section}.{key} must be true or false")
    if not isinstance(result["package"]["serving"], dict):
        raise ValueError(f"{source}: package.serving must be a mapping")
    _check_select(result, evaluate, source)
    _check_package(result["package"], source)
    return result


def load_run_config(path: str | Path | None = None, base: str | Path | None = "run-local") -> dict:
    """Loads, merges and validates a run config.

    Args:
        path: User run config file (None: only the base).
        base: Shipped config name or file merged under ``path`` (None: start from nothing).

    Returns:
        The validated config (see ``validate_run_config``).

    Raises:
        ValueError: Missing file, invalid YAML or an invalid setting.
    """
    merged: dict = {}
    if base is not None:
        base_path = (
            Path(base) if Path(str(base)).suffix in (".yaml", ".yml") else shipped_config_path(str(base))
        )
        merged = read_yaml_mapping(base_path)
    source = "run config"
    if path is not None:
        merged = merge_run_configs(merged, read_yaml_mapping(path))
        source = f"run config {path}"
    return validate_run_config(merged, source=source)


def pipeline_arguments(
    run_config: dict, data_uri: str = "synthetic", dataset_config: str | None = None
) -> dict[str, Any]:
    """Turns a validated run config into the pipeline's parameters.

    Args:
        run_config: Output of ``load_run_config`` / ``validate_run_config``.
        data_uri: Raw data location (``synthetic``, a directory or a gs:// prefix).
        dataset_config: Data-set config name, file or gs:// URI (None: default for the data).

    Returns:
        Keyword arguments for the pipeline function or ``kfp.Client().create_run_from_pipeline_package``.
    """
    return {
        "data_uri": str(data_uri),
        "dataset_config": dataset_config or "",
        "methods": list(run_config["methods"]),
        "preprocess_config": json.dumps(run_config["preprocess"], sort_keys=True),
        "train_config": json.dumps(run_config["train"], sort_keys=True),
        "evaluate_config": json.dumps(run_config["evaluate"], sort_keys=True),
        "select_metric": run_config["select"]["metric"],
        "select_scenario": run_config["select"]["scenario"],
        "fail_if_worse": run_config["select"]["fail_if_worse"],
        "model_name": run_config["package"]["model_name"],
        "serving_config": json.dumps(run_config["package"]["serving"], sort_keys=True),
        "output_uri": run_config["package"]["output_uri"] or "",
        "publish_if_worse": run_config["package"]["publish_if_worse"],
    }
