"""The run-configuration reference in docs/pipeline.md states every step's real defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

DOC = Path(__file__).resolve().parents[1] / "docs" / "pipeline.md"
ROW = re.compile(r"^\| `([a-z_0-9]+)` \| `([^`]*)` \|", re.MULTILINE)


def documented_defaults(section: str) -> dict[str, object]:
    """``key -> default`` of the table under ``### `section` ``."""
    text = DOC.read_text()
    start = text.index(f"### `{section}`")
    end = text.find("\n### ", start + 1)
    return {key: yaml.safe_load(value) for key, value in ROW.findall(text[start : end if end > 0 else None])}


@pytest.mark.parametrize(
    "section, module",
    [("preprocess", "metarec.preprocessing"), ("train", "metarec.training")],
)
def test_every_default_is_documented_with_its_value(section, module):
    import importlib

    defaults = importlib.import_module(module).DEFAULTS
    documented = documented_defaults(section)
    # min_ratings / max_ratings share one row; the rest must match key by key.
    shared = {"min_ratings", "max_ratings"} if section == "preprocess" else set()
    assert set(defaults) - shared == set(documented) - shared
    for key in set(documented) - shared:
        assert documented[key] == defaults[key], key


ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"
QUALIFIED_CALL = re.compile(r"(?<![\w.])(metarec(?:\.\w+)+|(?:adapter|learner|model)\.\w+)\(")
# The instances the contract calls methods on: ``adapter.score(...)`` is ``metarec.meta.Adapter.score``.
INSTANCES = {"adapter": "metarec.meta.Adapter", "learner": "metarec.meta.MetaLearner",
             "model": "metarec.model.PreferenceModel"}  # fmt: skip


def _parameter_names(arguments: str) -> list[str]:
    """Names in a documented argument list (annotations, defaults and ``*``/``**`` dropped)."""
    names, depth, current = [], 0, ""
    for char in arguments + ",":
        if char == "," and depth == 0:
            if current.strip():
                names.append(re.split(r"[:=]", current.strip().lstrip("*"))[0].strip())
            current = ""
            continue
        depth += char in "([{"
        depth -= char in ")]}"
        current += char
    return names


def documented_signatures() -> list[tuple[str, list[str]]]:
    """``(qualified name, parameter names)`` of every ``metarec.x.y(...)`` in ARCHITECTURE.md's code blocks."""
    text = ARCHITECTURE.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    found = []
    for block in blocks:
        for match in QUALIFIED_CALL.finditer(block):
            depth, end = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(block[end], 0)
                end += 1
            arguments = re.sub(r"#[^\n]*", "", block[match.end() : end - 1])
            name = match.group(1)
            instance, _, method = name.partition(".")
            found.append((f"{INSTANCES[instance]}.{method}" if instance in INSTANCES else name,
                          _parameter_names(arguments)))  # fmt: skip
    return found


def _resolve(qualified: str):
    import importlib

    parts = qualified.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ImportError(qualified)


def test_architecture_lists_public_signatures_as_the_code_has_them():
    import dataclasses
    import inspect

    signatures = documented_signatures()
    names = {name for name, _ in signatures}
    # The contract's core entries are there (the check below cannot pass by finding nothing).
    assert {"metarec.meta.Adapter", "metarec.meta.AdaptSettings", "metarec.training.run_meta_training",
            "metarec.packaging.build_archive", "metarec.model.ModelConfig"} <= names  # fmt: skip
    for qualified, documented in signatures:
        target = _resolve(qualified)
        if dataclasses.is_dataclass(target):
            actual = [field.name for field in dataclasses.fields(target)]
        else:
            actual = [name for name in inspect.signature(target).parameters if name != "self"]
        assert documented == actual, f"{qualified}: documented {documented}, code has {actual}"


def test_the_architecture_layout_lists_every_module_of_the_core_package():
    """A newcomer finds where a thing lives from docs/ARCHITECTURE.md's layout: no module is missing."""
    package = ARCHITECTURE.parents[1] / "src" / "metarec"
    text = ARCHITECTURE.read_text()
    layout = text[text.index("## Layout") : text.index("\n## ", text.index("## Layout") + 1)]
    modules = [
        path.relative_to(package).as_posix()
        for path in sorted(package.rglob("*.py"))
        if path.name != "__init__.py" and "configs" not in path.parts
    ]
    assert modules and [m for m in modules if f"  {m} " not in layout] == []


def test_the_architecture_layout_names_every_metarec_sub_command():
    """The layout's cli.py line lists the ``metarec`` sub-commands, those the pipelines plug in included."""
    from metarec.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    line = next(line for line in ARCHITECTURE.read_text().splitlines() if line.startswith("  cli.py "))
    assert commands and [name for name in commands if not re.search(rf"\b{name}\b", line)] == []


def test_the_architecture_layout_lists_every_serving_module():
    """The request protocol is several modules, each one job: the layout names each (serving/<file>)."""
    folder = ARCHITECTURE.parents[1] / "serving"
    text = ARCHITECTURE.read_text()
    layout = text[text.index("## Layout") : text.index("\n## ", text.index("## Layout") + 1)]
    modules = [f"serving/{path.name}" for path in sorted(folder.glob("*.py")) if path.name != "__init__.py"]
    assert len(modules) > 1 and [m for m in modules if f"  {m} " not in layout] == []


# ----------------------------------------------------------------------------------------------------
# Component READMEs: what a platform team copies must compile and match the component's interface.

REPO = Path(__file__).resolve().parents[1]
COMPONENT_READMES = sorted((REPO / "components").glob("*/README.md"))
# Upstream tasks a README fragment ("inside a pipeline: ...") may name, built from the committed YAMLs.
FRAGMENT_CONTEXT = """
data = preprocess(data_uri="synthetic")
with dsl.ParallelFor(["maml", "reptile"]) as method:
    train = meta_train(dataset=data.outputs["dataset"], method=method)
scores = evaluate(dataset=data.outputs["dataset"], models=dsl.Collected(train.outputs["model"]))
chosen = select_model(evaluation=scores.outputs["evaluation"], models=dsl.Collected(train.outputs["model"]))
packaged = package_model(model=chosen.outputs["selected_model"], evaluation=scores.outputs["evaluation"],
                         selection=chosen.outputs["selection"], dataset=data.outputs["dataset"])
"""


def _python_examples() -> list[tuple[str, str]]:
    """``(where, code)`` of each component README's first Python block and of docs/pipeline.md's."""
    examples = []
    for readme in COMPONENT_READMES:
        blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.DOTALL)
        examples.append((readme.relative_to(REPO).as_posix(), blocks[0]))
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL):
        if "load_component_from_file" in block:
            examples.append(("docs/pipeline.md", block))
    return examples


@pytest.mark.parametrize(
    "where, code", _python_examples(), ids=lambda value: value if value.endswith(".md") else ""
)
def test_component_examples_compile(where, code, tmp_path, monkeypatch):
    """Each "use it alone" example builds a pipeline KFP compiles: every required input is given and
    every input, parameter and output it names exists."""
    from kfp import compiler, components, dsl

    monkeypatch.chdir(tmp_path)  # examples that compile write their YAML here
    code = code.replace('"components/', f'"{REPO}/components/')
    if "@dsl.pipeline" not in code:
        # A fragment to paste into a pipeline: run it inside one, after the upstream steps it names.
        # Its imports and component loading stay at module level, the calls go into the pipeline.
        lines = code.splitlines()
        top = [line for line in lines if line.startswith(("from ", "import ")) or "load_component" in line]
        body = FRAGMENT_CONTEXT + "\n".join(line for line in lines if line not in top)
        indented = "\n".join("    " + line for line in body.splitlines())
        code = "\n".join(top) + f"\n@dsl.pipeline(name='example')\ndef pipe():\n{indented}\n"
    namespace = {"dsl": dsl, "components": components, "compiler": compiler}
    for name in ("preprocess", "meta_train", "evaluate", "select_model", "package_model"):
        namespace[name] = components.load_component_from_file(f"{REPO}/components/{name}/component.yaml")
    # dont_inherit: this module's `from __future__ import annotations` would turn the examples' type
    # hints into strings, which KFP refuses.
    exec(compile(code, where, "exec", dont_inherit=True), namespace)  # noqa: S102 - the documented example
    compiler.Compiler().compile(namespace["pipe"], str(tmp_path / "example.yaml"))


TABLE_ROW = re.compile(r"^\| `(\w+)` \| (input|output|parameter) \|([^|]+)\|([^|]*)\|", re.MULTILINE)
# How a README names a compiled type (parameters by their Python type, artifacts by their class).
PARAMETER_TYPES = {"String": "str", "Integer": "int", "Boolean": "bool", "Double": "float"}
# Defaults the backend fills in at run time, written as words in the READMEs.
PLACEHOLDER_DEFAULTS = {"{{$.pipeline_job_uuid}}": "KFP run id", "{{$.pipeline_task_uuid}}": "KFP task id"}


@pytest.mark.parametrize("readme", COMPONENT_READMES, ids=lambda path: path.parent.name)
def test_component_readme_tables_state_kind_type_and_default(readme):
    """The README table's kind, type and default of every row are the compiled component's."""
    from kfp import components

    spec = components.load_component_from_file(str(readme.parent / "component.yaml")).component_spec
    rows = TABLE_ROW.findall(readme.read_text())
    assert {name for name, *_ in rows} == {*spec.inputs, *(spec.outputs or {})}
    for name, kind, documented_type, documented_default in rows:
        documented_type, documented_default = documented_type.strip(), documented_default.strip()
        if kind == "output":
            compiled, default = spec.outputs[name], None
        else:
            compiled = spec.inputs[name]
            default = PLACEHOLDER_DEFAULTS.get(compiled.default, compiled.default)
        artifact = compiled.type.startswith("system.")
        assert (kind == "parameter") == (not artifact and kind != "output"), f"{name}: kind {kind}"
        if artifact:
            title = compiled.type.removeprefix("system.").split("@")[0]
            expected_type = (
                f"`List[{title}]`" if getattr(compiled, "is_artifact_list", False) else f"`{title}`"
            )
            assert documented_type == expected_type, f"{name}: documented {documented_type}"
            continue
        assert documented_type.split(" ")[0] == PARAMETER_TYPES[compiled.type], f"{name}: {documented_type}"
        if kind == "output":
            continue
        if not compiled.optional:
            assert documented_default == "(required)", (
                f"{name} is required, documented {documented_default!r}"
            )
        elif isinstance(default, str) and default in PLACEHOLDER_DEFAULTS.values():
            assert documented_default == default, name
        else:
            value = yaml.safe_load(documented_default.strip("`")) if documented_default else None
            if compiled.type == "String":
                value = "" if documented_default == '`""`' else str(value)
            assert value == default, f"{name}: documented default {documented_default}, compiled {default!r}"


# ----------------------------------------------------------------------------------------------------
# Commands, paths and links in the user-facing documents

USER_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "manifests" / "README.md",
             *COMPONENT_READMES]  # fmt: skip
COMMAND = re.compile(
    r"(?:^|[\s`(/])(metarec (?:run-local|compile|serve|demo-request|tune)\b|python -m metarec\.[\w.]+"
    r"|python bench/\w+\.py)([^`\n#|]*)"
)


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(document, command, its --flags)`` of every ``metarec ...``, ``python -m metarec...`` and
    ``python bench/...`` written in a user-facing document (continued lines joined)."""
    found = []
    for doc in USER_DOCS:
        text = doc.read_text().replace("\\\n", " ")
        for match in COMMAND.finditer(text):
            flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", match.group(2))
            found.append((doc.relative_to(REPO).as_posix(), match.group(1), flags))
    return found


def _sources(command: str) -> str:
    """Source text of the module or script a ``python ...`` command runs, with the bench modules it imports."""
    import importlib.util

    if command.startswith("python -m "):
        spec = importlib.util.find_spec(command.split()[-1])
        if spec.submodule_search_locations is None:
            return Path(spec.origin).read_text()
        # A package: ``-m`` runs its __main__, which imports its parser from a module of the package.
        main = importlib.util.find_spec(f"{spec.name}.__main__")
        text = Path(main.origin).read_text()
        for module in re.findall(rf"^from ({re.escape(spec.name)}\.\w+) import", text, flags=re.MULTILINE):
            text += Path(importlib.util.find_spec(module).origin).read_text()
        return text
    script = REPO / command.split()[-1]
    text = script.read_text()
    for module in re.findall(r"^from (\w+) import", text, flags=re.MULTILINE):
        if (script.parent / f"{module}.py").is_file():
            text += (script.parent / f"{module}.py").read_text()
    return text


def test_a_package_command_is_checked_against_the_module_that_parses_its_flags():
    """``python -m metarec.storage`` runs the package's __main__: its flags are defined in storage/cli.py,
    not in the package __init__ (which would make every documented flag look unknown)."""
    assert '"--require-complete"' in _sources("python -m metarec.storage")


def test_every_documented_command_flag_exists():
    """A ``metarec X --flag`` is an option of sub-command X; a ``python ... --flag`` is an option its
    script or module defines."""
    from metarec.cli import build_parser

    parser = build_parser()
    (subcommands,) = [action for action in parser._actions if action.dest == "command"]
    commands = documented_commands()
    assert len(commands) > 30 and any(flags for *_, flags in commands)  # the check cannot pass on nothing
    unknown = []
    for where, command, flags in commands:
        if command.startswith("metarec "):
            known = set(subcommands.choices[command.split()[1]]._option_string_actions)
        else:
            source = _sources(command)
            known = {flag for flag in flags if f'"{flag}"' in source}
        unknown += [f"{where}: {command} {flag}" for flag in flags if flag not in known]
    assert unknown == []


PATH_TOKEN = re.compile(r"(?<![\w./:@-])((?:[\w.<>*-]+/)+[\w.<>*-]*)")


def _tracked_folders() -> set[Path]:
    """Every folder holding a file git tracks: a checkout's ignored outputs (``build/``, ``runs/``,
    ``.venv``) are not the repository's, and a clean clone lacks them."""
    import subprocess

    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {REPO / parent for name in listed.splitlines() for parent in Path(name).parents}


def test_every_repository_path_in_the_documents_exists():
    """A path whose first folder is one of the repository's (or of the document's own folder) exists;
    ``<name>`` placeholders and ``*`` match anything."""
    import glob

    tracked = _tracked_folders()
    missing = []
    for doc in USER_DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for token in PATH_TOKEN.findall(line):
                first = token.split("/")[0]
                bases = [
                    base
                    for base in (REPO, doc.parent)
                    if first not in ("", ".", "..") and (base / first) in tracked
                ]
                pattern = re.sub(r"<[^>]*>", "*", token.rstrip("."))
                # `manifests/README's`: a file named without its extension in prose.
                if bases and not any(glob.glob(str(base / pattern)) or glob.glob(str(base / pattern) + ".*")
                                     for base in bases):  # fmt: skip
                    missing.append(f"{doc.relative_to(REPO)}:{number}: {token}")
    assert missing == []


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in USER_DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
            elif anchor and anchor not in {
                _anchor(h) for h in re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
            }:
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


SERVING = REPO / "docs" / "serving.md"


def test_serving_doc_names_every_route_in_its_404_row():
    """An unknown suffix answers 404: the row must not call a real route unknown."""
    from metarec.serving.routes import ROUTES

    (row,) = [line for line in SERVING.read_text().splitlines() if line.startswith("| 404 |")]
    suffixes = row[row.index("unknown endpoint suffix") :]
    assert [route for route in ROUTES if route and f"`{route}`" not in suffixes] == []


def test_serving_doc_names_every_checked_in_config_properties():
    """The security section lists where the rendered config.properties files live; each is a real target."""
    from metarec.torchserve_config import TARGETS

    text = SERVING.read_text()
    section = text[text.index("## Security choices") : text.index("What was verified")]
    named = [token.rstrip("/") for token in re.findall(r"`([\w./-]+/[\w./-]*)`", section)]
    for target in TARGETS:
        folder = target.rsplit("/", 1)[0]
        assert any(token == target or folder.endswith(token) for token in named), target
    for token in named:
        assert any(target == token or target.rsplit("/", 1)[0].endswith(token) for target in TARGETS), token


def test_documented_pytorchjob_permissions_cover_what_the_launcher_calls():
    """Each place that tells a platform team which verbs on pytorchjobs to grant names every verb the
    launcher's Kubernetes calls need (a retry's adoption replaces the job: ``update``)."""
    calls = {"create_namespaced": "create", "get_namespaced": "get", "replace_namespaced": "update",
             "patch_namespaced": "patch", "delete_namespaced": "delete", "list_namespaced": "list"}  # fmt: skip
    source = (REPO / "components" / "meta_train_pytorchjob" / "pytorchjob.py").read_text()
    needed = {verb for call, verb in calls.items() if f".{call}_custom_object(" in source}
    assert {"create", "get", "delete"} <= needed
    role = yaml.safe_load((REPO / "manifests" / "pipeline-rbac" / "role.yaml").read_text())
    (rule,) = [rule for rule in role["rules"] if "pytorchjobs" in rule["resources"]]
    assert needed <= set(rule["verbs"])
    statements = []
    for doc in USER_DOCS:
        text = " ".join(doc.read_text().split())
        for match in re.finditer(r"(?i)pytorchjobs(?:\.kubeflow\.org)?", text):
            nearby = text[max(0, match.start() - 80) : match.end() + 40]
            verbs = set(re.findall(r"\b(create|get|list|watch|update|patch|delete)\b", nearby))
            if len(verbs) >= 2:  # a list of permissions, not a passing mention
                statements.append((doc.relative_to(REPO).as_posix(), verbs))
    assert len(statements) >= 3
    assert [(where, sorted(needed - verbs)) for where, verbs in statements if needed - verbs] == []


def test_documented_run_configs_are_accepted():
    """The run-config examples of README.md and docs/pipeline.md pass validation and every step's settings."""
    from metarec.evaluation import EvaluateSettings
    from metarec.pipelines.run_config import validate_run_config
    from metarec.preprocessing import PreprocessSettings
    from metarec.selection import SelectSettings
    from metarec.serving_settings import ServingSettings
    from metarec.training import TrainSettings

    examples = [block for doc in (REPO / "README.md", DOC)
                for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(), flags=re.DOTALL)]  # fmt: skip
    assert len(examples) >= 2
    for example in examples:
        config = validate_run_config(yaml.safe_load(example))
        PreprocessSettings.from_dict(config["preprocess"])
        TrainSettings.from_dict(config["train"])
        EvaluateSettings.from_dict(config["evaluate"])
        SelectSettings.from_dict(config["select"])
        ServingSettings.from_dict(config["package"]["serving"])


def _compare_serving_defaults(pairs: list[tuple[str, str]]) -> list[str]:
    """``(key, documented default)`` pairs that differ from ``ServingSettings``'s defaults."""
    import dataclasses

    from metarec.serving_settings import ServingSettings

    defaults = {field.name: field.default for field in dataclasses.fields(ServingSettings)}
    wrong = []
    for key, text in pairs:
        text = text.strip().strip("`")
        value = text if isinstance(defaults.get(key), str) else yaml.safe_load(text)
        if key not in defaults or value != defaults[key]:
            wrong.append(f"{key}: documented {text.strip()!r}, code {defaults.get(key, 'no such setting')!r}")
    return wrong


def test_serving_settings_defaults_are_documented_with_their_values():
    """docs/serving.md's model-config table and docs/pipeline.md's `serving` row state the real defaults."""
    pairs = []
    table = SERVING.read_text().split("| key (serving_config) | default | meaning |")[1].split("\n\n")[0]
    for keys, default in re.findall(r"^\| ([^|]+) \|([^|]*)\|", table, flags=re.MULTILINE):
        names = re.findall(r"`(\w+)`", keys)
        pairs += re.findall(r"`(\w+)` \(([^)]+)\)", keys)  # `inference_port` (8085)
        values = [value for value in default.split("/") if value.strip()]
        if values and len(values) == len(names):
            pairs += list(zip(names, values, strict=True))
    (row,) = [line for line in DOC.read_text().splitlines() if line.startswith("| `serving` |")]
    for names, values in re.findall(r"((?:`\w+`/?)+) \(([^)]+)\)", row):
        keys = re.findall(r"`(\w+)`", names)
        if len(keys) == len(values.split("/")):
            pairs += list(zip(keys, values.split("/"), strict=True))
    assert len(pairs) > 30
    assert _compare_serving_defaults(pairs) == []


def test_pipeline_parameters_are_documented_with_their_defaults():
    """docs/pipeline.md's "Pipeline parameters" paragraph names every parameter with its real default."""
    from metarec.pipelines.metarec_pipeline import PipelineOptions, build_pipeline

    inputs = build_pipeline(PipelineOptions(variant="cpu")).component_spec.inputs
    text = " ".join(DOC.read_text().split())
    paragraph = text[text.index("Pipeline parameters (all optional):") : text.index("See [cluster.md]")]
    documented = dict(re.findall(r"`(\w+)` \(`([^`]*)`", paragraph))
    for group, default in re.findall(r"((?:`\w+`, )+`\w+`) \(JSON objects, `([^`]*)`", paragraph):
        documented.update(dict.fromkeys(re.findall(r"`(\w+)`", group), default))
    assert set(documented) == set(inputs)
    for name, default in documented.items():
        value = yaml.safe_load(default) if not isinstance(inputs[name].default, str) else default.strip('"')
        expected = inputs[name].default
        assert value == expected, f"{name}: documented {default!r}, pipeline {expected!r}"
