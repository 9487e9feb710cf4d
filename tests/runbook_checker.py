"""The checker of ``tests/test_runbook_commands.py``: every ``kubectl`` command the user-facing documents
give must name what the manifests create.

On-call runs these commands as written: a renamed Deployment, container, label or Service port leaves
them failing with ``NotFound`` at the worst moment. This module extracts each ``kubectl`` command from the
documents (fenced shell blocks, commented-out commands in them, and inline code in prose), renders every
kustomization under ``manifests/`` with ``kubectl kustomize`` (plus the PyTorchJob the
``meta_train_pytorchjob`` component builds in code), and checks, per command:

* a ``-k``/``-f`` path exists, and a ``-k`` folder renders; with ``-n``, it pins no other namespace
  (``kubectl`` refuses such objects);
* a ``TYPE/NAME`` or ``TYPE NAME`` (``logs``/``exec``/``port-forward``: a bare ``NAME`` is a pod) is an
  object of that kind in some rendered source, in a namespace the command can reach;
* ``-c CONTAINER`` is a container or init container of that workload; without ``-c``, ``logs``/``exec``
  reach a single container (or one named by ``kubectl.kubernetes.io/default-container``);
* ``-l`` selects at least one pod template (or object of the named kind);
* a literal namespace is one the manifests set; ``port-forward`` ports are ports of the target;
* ``create secret`` names a Secret (and key) a workload reads, ``create rolebinding`` a Role the manifests
  define, ``label namespace`` a label some ``namespaceSelector`` selects.

Shell variables: one assigned earlier in the same document (``OVERLAY=...``) is substituted; in ``-n`` a
variable stands for any namespace the documents move a kustomization into (``kustomize edit set namespace
$VAR``) or its documented default (docs/cluster.md: ``NS=kubeflow-user-example-com``); ``<placeholders>``,
``UPPER_CASE`` words and ``$(...)`` match anything. What exists only at run time is in the explicit
allow-lists below, each with its reason, and each entry must still be used by a document.

The checker is a plain function (:func:`check_command`): the tests feed it the documents' commands
(:func:`documented_commands`) and broken lines to show each rule fails.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import re
from pathlib import Path

import yaml
from test_manifests import MANIFESTS, render

REPO = MANIFESTS.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "manifests" / "README.md",
        *sorted((REPO / "components").glob("*/README.md"))]  # fmt: skip

# ----------------------------------------------------------------------------------------------------
# Allow-lists: what the documents name but no manifest here creates. Keep each entry's reason exact.

# Objects an operator or installer creates at run time, by (kind, name).
RUNTIME_OBJECTS = {
    # KServe (v0.11+) in RawDeployment mode names the predictor's Deployment `<InferenceService>-predictor`
    # (older releases: `-predictor-default`); test_kserve_predictor_allowance_matches_the_inferenceservice
    # keeps the InferenceService `metarec` and its mode that this name derives from.
    ("Deployment", "metarec-predictor"): "created by KServe from InferenceService metarec (RawDeployment)",
    # Kubeflow's profile controller creates this account in every profile namespace (KFP runs as it).
    (
        "ServiceAccount",
        "default-editor",
    ): "created by Kubeflow's profile controller in each profile namespace",
    # Kubeflow Pipelines' single-user install creates it; pipeline-rbac binds it too.
    ("ServiceAccount", "pipeline-runner"): "created by a single-user Kubeflow Pipelines install",
}
# Paths the reader makes: not in the repository.
USER_PATHS = {
    # docs/tuning.md's own overlay (the yaml block it is named in); tests/test_katib.py renders one.
    "katib-overlay": "the reader's overlay over manifests/katib, written in docs/tuning.md's yaml block",
}
# Secrets a documented command creates that only a reader-made copy of a manifest mounts.
USER_SECRETS = {
    # Memorystore with TLS: manifests/README.md has the reader mount it in a copy of deployment-state.yaml.
    "metarec-redis-ca": "mounted only in the reader's copy of deployment-state.yaml (Memorystore TLS)",
}
# Namespace labels read by other controllers than these manifests.
EXTERNAL_NAMESPACE_LABELS = {
    "katib.kubeflow.org/metrics-collector-injection": "read by Katib's webhook (StdOut metrics collector)",
}

KINDS = {
    "Deployment": ["deploy", "deployment", "deployments"],
    "StatefulSet": ["sts", "statefulset", "statefulsets"],
    "Service": ["svc", "service", "services"],
    "Pod": ["po", "pod", "pods"],
    "ConfigMap": ["cm", "configmap", "configmaps"],
    "Secret": ["secret", "secrets"],
    "ServiceAccount": ["sa", "serviceaccount", "serviceaccounts"],
    "Namespace": ["ns", "namespace", "namespaces"],
    "HorizontalPodAutoscaler": ["hpa", "horizontalpodautoscaler", "horizontalpodautoscalers"],
    "PodDisruptionBudget": ["pdb", "poddisruptionbudget", "poddisruptionbudgets"],
    "NetworkPolicy": ["netpol", "networkpolicy", "networkpolicies"],
    "Role": ["role", "roles"],
    "RoleBinding": ["rolebinding", "rolebindings"],
    "ReplicaSet": ["rs", "replicaset", "replicasets"],
    "Job": ["job", "jobs"],
    "InferenceService": ["isvc", "inferenceservice", "inferenceservices"],
    "PyTorchJob": ["pytorchjob", "pytorchjobs"],
    "Experiment": ["experiment", "experiments"],
    "Trial": ["trial", "trials"],
    "PodMonitoring": ["podmonitoring", "podmonitorings"],
    "AuthorizationPolicy": ["authorizationpolicy", "authorizationpolicies"],
    "PeerAuthentication": ["peerauthentication", "peerauthentications"],
}
KIND_OF = {alias: kind for kind, aliases in KINDS.items() for alias in aliases}
# Verbs whose positional arguments name objects (`TYPE/NAME ...` or `TYPE NAME ...`).
OBJECT_VERBS = {"get", "describe", "delete", "patch", "edit", "scale", "annotate", "label", "wait", "top"}
POD_VERBS = {"logs", "exec", "port-forward", "attach"}  # a bare NAME is a pod
VERBS = OBJECT_VERBS | POD_VERBS | {"apply", "create", "rollout", "kustomize", "replace", "set", "cp", "run",
                                    "expose", "autoscale", "explain", "diff", "debug", "auth", "config"}  # fmt: skip
# Flags that take a value when written apart from it (`-n NS`); `logs -f`/`-p` are booleans.
VALUE_FLAGS = {"-n", "--namespace", "-c", "--container", "-l", "--selector", "-k", "--kustomize", "-f",
               "--filename", "-o", "--output", "-p", "--patch", "--type", "--field-manager", "--tail",
               "--since", "--timeout", "--replicas", "--role", "--clusterrole", "--serviceaccount",
               "--from-literal", "--from-file", "--for", "--context", "--image"}  # fmt: skip
LOGS_BOOLEANS = {"-f", "-p"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "ReplicaSet", "Pod", "PyTorchJob", "Experiment"}


# ----------------------------------------------------------------------------------------------------
# Rendered objects


@dataclasses.dataclass
class Obj:
    """One object a source creates (or a pod it derives, e.g. a StatefulSet's ``NAME-0``)."""

    source: str  # kustomization folder relative to manifests/, or the component that builds it
    kind: str
    name: str
    namespace: str | None  # None: not pinned, created where `-n` points
    labels: dict
    raw: dict
    pod_templates: list[dict]  # {"metadata": ..., "spec": PodSpec}


def _pod_templates(obj: dict) -> list[dict]:
    kind, spec = obj["kind"], obj.get("spec") or {}
    if kind == "Pod":
        return [{"metadata": obj.get("metadata") or {}, "spec": spec}]
    if kind == "PyTorchJob":
        return [replica["template"] for replica in spec["pytorchReplicaSpecs"].values()]
    if kind == "Experiment":  # the trials' Job: Katib creates its pods at run time
        return [spec["trialTemplate"]["trialSpec"]["spec"]["template"]]
    if "template" in spec and "spec" in spec["template"]:
        return [spec["template"]]
    return []


def _derived_pods(obj: Obj) -> list[Obj]:
    """Pods whose names a controller derives from the object's (StatefulSet, PyTorchJob)."""
    pods = []
    if obj.kind == "StatefulSet":
        names = [f"{obj.name}-{i}" for i in range(obj.raw["spec"].get("replicas", 1))]
        pods = [(name, obj.pod_templates[0]) for name in names]
    elif obj.kind == "PyTorchJob":
        for kind, replica in obj.raw["spec"]["pytorchReplicaSpecs"].items():
            pods += [
                (f"{obj.name}-{kind.lower()}-{i}", replica["template"]) for i in range(replica["replicas"])
            ]
    return [Obj(obj.source, "Pod", name, obj.namespace, (template.get("metadata") or {}).get("labels") or {},
                {"kind": "Pod", "metadata": template.get("metadata") or {}, "spec": template["spec"]},
                [template]) for name, template in pods]  # fmt: skip


def build_index(sources: dict[str, list[dict]]) -> list[Obj]:
    """Objects of every source (``source -> rendered objects``), derived pods included."""
    index = []
    for source, objects in sources.items():
        for raw in objects:
            meta = raw["metadata"]
            obj = Obj(source, raw["kind"], meta["name"], meta.get("namespace"), meta.get("labels") or {}, raw,
                      _pod_templates(raw))  # fmt: skip
            index += [obj, *_derived_pods(obj)]
    # The namespaces the manifests pin (created by `kubectl create namespace` or a Kubeflow profile);
    # cluster-scoped, so any `-n` reaches them.
    for namespace in sorted({obj.namespace for obj in index if obj.namespace}):
        raw = {"kind": "Namespace", "metadata": {"name": namespace}}
        index.append(Obj("namespace of the manifests", "Namespace", namespace, None, {}, raw, []))
    return index


def _pipeline_pytorchjob() -> dict:
    """The job ``meta_train_pytorchjob`` builds in code (Master + Worker), created in the run's namespace."""
    from metarec.components.meta_train_pytorchjob import pytorchjob

    job = pytorchjob.build_pytorchjob(
        name=pytorchjob.job_name("maml", "run", "task"), namespace="", image="metarec-components",
        method="maml", preprocessed_uri="gs://b/p", output_uri="gs://b/m", num_nodes=2,
    )  # fmt: skip
    del job["metadata"]["namespace"]  # the run's namespace: any
    return job


def _includes(kustomization: str) -> set[str]:
    """The kustomizations one includes (``resources``/``components``), transitively; relative to manifests/."""
    file = MANIFESTS / kustomization / "kustomization.yaml"
    spec = yaml.safe_load(file.read_text())
    included = set()
    for entry in (spec.get("resources") or []) + (spec.get("components") or []):
        folder = (file.parent / entry).resolve()
        if (folder / "kustomization.yaml").is_file():
            name = folder.relative_to(MANIFESTS).as_posix()
            included |= {name, *_includes(name)}
    return included


def _included() -> set[str]:
    """Kustomizations another one includes, relative to manifests/."""
    return {
        name
        for p in MANIFESTS.rglob("kustomization.yaml")
        for name in _includes(str(p.parent.relative_to(MANIFESTS)))
    }


def real_index(applied: set[str]) -> list[Obj]:
    """What applying the manifests creates: every kustomization under manifests/, rendered, except the
    bases that only other kustomizations include (serving/base renders the Deployment without the
    overlays' namespace, which nothing applies as is) unless a document applies them, plus the
    pipeline's PyTorchJob.

    Args:
        applied: Kustomizations (relative to manifests/) a documented ``-k`` applies.
    """
    kustomizations = sorted(
        str(p.parent.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("kustomization.yaml")
    )
    bases = _included() - applied
    sources = {k: list(render(k)) for k in kustomizations if k not in bases}
    sources["components/meta_train_pytorchjob"] = [_pipeline_pytorchjob()]
    return build_index(sources)


def applied_kustomizations(commands: list[Command]) -> set[str]:
    """The ``-k`` folders (relative to manifests/) the commands apply or create."""
    applied = set()
    for command in commands:
        parsed = parse(command.words, command.assigned)
        if parsed.verb in ("apply", "create"):
            for path in parsed.flags.get("--kustomize", []):
                for match in glob.glob(str(REPO / re.sub(r"<[^>]*>", "*", path))):
                    if Path(match).resolve().is_relative_to(MANIFESTS):
                        applied.add(Path(match).resolve().relative_to(MANIFESTS).as_posix())
    return applied


# ----------------------------------------------------------------------------------------------------
# Extraction


@dataclasses.dataclass
class Command:
    """One documented ``kubectl`` invocation."""

    where: str  # document:line
    words: list[str]  # from `kubectl` to the end of the simple command, as written
    text: str
    assigned: dict[str, str]  # the variables the document assigned before it
    in_code: bool = True  # from a code block (its comments included), not a prose mention


def shell_lex(text: str, subs: list[tuple[int, str]] | None = None) -> list[tuple[str, str, int]]:
    """Splits shell text into ``(kind, text, offset)``: ``word``, ``op`` (``|``, ``&&``, ``;``, ``(``,
    ``)``, newline) and ``comment``. Quotes are removed; ``$(...)`` stays in its word and its body is
    appended to ``subs`` (with its offset) for lexing on its own. Unclosed quotes run to the end."""
    tokens: list[tuple[str, str, int]] = []
    word, start, i = None, 0, 0

    def flush():
        nonlocal word
        if word is not None:
            tokens.append(("word", word, start))
            word = None

    def add(chunk: str, at: int):
        nonlocal word, start
        if word is None:
            word, start = "", at
        word += chunk

    def substitution_end(j: int) -> int:  # j just after "$(": index of the matching ")"
        depth, quote = 1, None
        while j < len(text):
            c = text[j]
            if quote:
                quote = None if c == quote else quote
            elif c in "'\"":
                quote = c
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if not depth:
                    return j
            j += 1
        return j

    while i < len(text):
        c = text[i]
        if c == "\\" and text[i + 1 : i + 2] == "\n":  # line continuation
            i += 2
        elif c == "\\" and i + 1 < len(text):
            add(text[i + 1], i)
            i += 2
        elif c in " \t":
            flush()
            i += 1
        elif c == "#" and word is None:
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            tokens.append(("comment", text[i + 1 : end], i + 1))
            i = end
        elif c == "'":
            end = text.find("'", i + 1)
            end = len(text) if end < 0 else end
            add(text[i + 1 : end], i)
            i = end + 1
        elif c == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                if text.startswith("$(", j):
                    end = substitution_end(j + 2)
                    if subs is not None:
                        subs.append((j + 2, text[j + 2 : end]))
                    j = end
                j += 2 if text[j : j + 1] == "\\" else 1
            add(text[i + 1 : j], i)
            i = j + 1
        elif re.match(r"<[\w.-]+>", text[i:]):  # a documented placeholder, not a redirection
            placeholder = re.match(r"<[\w.-]+>", text[i:]).group(0)
            add(placeholder, i)
            i += len(placeholder)
        elif text.startswith("$(", i):
            end = substitution_end(i + 2)
            if subs is not None:
                subs.append((i + 2, text[i + 2 : end]))
            add(text[i : end + 1], i)
            i = end + 1
        elif c in "|&;()<>\n":
            flush()
            j = i + 1
            while c != "\n" and j < len(text) and text[j] in "|&;<>" and text[j] == c:
                j += 1
            tokens.append(("op", text[i:j], i))
            i = j
        else:
            add(c, i)
            i += 1
    flush()
    return tokens


@dataclasses.dataclass
class Context:
    """What the commands of the documents share: assignments and namespace moves, in document order."""

    assigned: dict[str, str] = dataclasses.field(default_factory=dict)  # this document's, in order
    defaults: dict[str, str] = dataclasses.field(default_factory=dict)  # first value, any document
    moved: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # VAR or name -> kustomizations
    applied: set[str] = dataclasses.field(default_factory=set)  # kustomizations the documents apply


def _substitute(word: str, assigned: dict[str, str]) -> str:
    def value(match):
        name = match.group(1) or match.group(2)
        return assigned.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, word)


def _simple_commands(tokens):
    """``(words with their offsets, whether the line or subshell ends after it)`` between operators."""
    current = []
    for kind, text, offset in tokens:
        if kind == "word":
            current.append((text, offset))
            continue
        if current:
            yield current, kind == "comment" or text in ("\n", ")")
        current = []
    if current:
        yield current, True


def commands_in_shell(
    text: str, where, context: Context, comments: list | None = None, in_code: bool = True
) -> list[Command]:
    """The ``kubectl`` commands of shell text (substitutions included); records assignments and
    ``cd DIR && kustomize edit set namespace X`` moves in ``context``; comment texts go to ``comments``."""
    subs: list[tuple[int, str]] = []
    tokens = shell_lex(text, subs)
    if comments is not None:
        comments += [(offset, body) for kind, body, offset in tokens if kind == "comment"]
    found, cwd = [], None
    for words, line_ends in _simple_commands(tokens):
        names = [w for w, _ in words]
        if names[0] == "export":
            names = names[1:]
        if names and all(re.fullmatch(r"\w+=.*", n, flags=re.S) for n in names):
            for assignment in names:
                var, _, value = assignment.partition("=")
                if not value.startswith("$("):  # CUR=$(kubectl ...): a value only a cluster gives
                    context.assigned[var] = _substitute(value, context.assigned)
                    context.defaults.setdefault(var, context.assigned[var])
        elif names[:1] == ["cd"] and len(names) > 1:
            cwd = names[1]
        elif names[:4] == ["kustomize", "edit", "set", "namespace"] and cwd and len(names) > 4:
            context.moved.setdefault(names[4].lstrip("$"), set()).add(cwd.rstrip("/"))
        elif names[:1] == ["kubectl"] and len(names) > 1:
            found.append(Command(where(words[0][1]), names, " ".join(names), dict(context.assigned), in_code))
        if line_ends:
            cwd = None  # `(cd DIR && ...)` or `cd DIR && ...` on one line
    for offset, body in subs:  # $(kubectl ...), also inside assignments and double quotes
        found += commands_in_shell(body, _shifted(where, offset), context, in_code=in_code)
    return found


def _shifted(where, base: int):
    """``where`` for text that starts at ``base`` of the text ``where`` locates."""
    return lambda offset: where(base + offset)


INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)


def commands_in_prose(text: str, where, context: Context, comment: bool = False) -> list[Command]:
    """``kubectl`` commands in inline code spans, and in a comment that is one (``# kubectl ...`` or
    ``...: kubectl ...``)."""
    found = []
    for match in INLINE_CODE.finditer(text):
        if re.search(r"(?:^|[\s(|;&])kubectl\s", match.group(2)):
            span = match.group(2).replace("\n", " ")  # inline code: a line break is a space
            found += commands_in_shell(span, _shifted(where, match.start(2)), context, in_code=comment)
    bare = re.match(r"\s*kubectl\s|.*?:\s+(?=kubectl\s)", text) if comment else None
    if bare and "`" not in text[: bare.end()]:
        start = bare.end() if not bare.group(0).strip().startswith("kubectl") else text.index("kubectl")
        found += commands_in_shell(text[start:], _shifted(where, start), context)
    return found


FENCE = re.compile(r"^\s*```(\w*)\s*$")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}


def document_commands(text: str, name: str, context: Context) -> list[Command]:
    """Every ``kubectl`` command of one Markdown document."""
    context.assigned = {}
    lines = text.split("\n")
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)

    def locate(base: int):
        import bisect

        return lambda offset: f"{name}:{bisect.bisect_right(offsets, base + offset)}"

    found, prose_start, number = [], 0, 0
    while number < len(lines):
        fence = FENCE.match(lines[number])
        if not fence:
            number += 1
            continue
        prose = text[prose_start : offsets[number]]
        found += commands_in_prose(prose, locate(prose_start), context)
        end = next((n for n in range(number + 1, len(lines)) if FENCE.match(lines[n])), len(lines))
        block_start = offsets[number + 1]
        block = text[block_start : offsets[end]]
        comments: list[tuple[int, str]] = []
        if fence.group(1) in SHELL_LANGUAGES:
            found += commands_in_shell(block, locate(block_start), context, comments)
        else:  # yaml, python: only their comments can hold commands
            comments = [(m.start(1), m.group(1)) for m in re.finditer(r"#(.*)", block)]
        for offset, comment in comments:
            found += commands_in_prose(comment, locate(block_start + offset), context, comment=True)
        number, prose_start = end + 1, offsets[min(end + 1, len(lines))]
    found += commands_in_prose(text[prose_start:], locate(prose_start), context)
    return found


def documented_commands() -> tuple[list[Command], Context]:
    """``kubectl`` commands of every user-facing document, and the context they share."""
    context = Context()
    commands = []
    for doc in DOCS:
        commands += document_commands(doc.read_text(), doc.relative_to(REPO).as_posix(), context)
    context.applied = applied_kustomizations(commands)
    return commands, context


# ----------------------------------------------------------------------------------------------------
# Checking


def _wild(word: str) -> bool:
    """A placeholder: ``<x>``, ``$VAR``/``$(...)`` left unresolved, or an ``UPPER_CASE`` word."""
    return "<" in word or "$" in word or bool(re.fullmatch(r"[A-Z][A-Z0-9_]+", word))


@dataclasses.dataclass
class Parsed:
    verb: str
    positionals: list[str]
    flags: dict[str, list[str]]  # long name -> values ("" for a boolean or a flag without its value)


CANONICAL = {"-n": "--namespace", "-c": "--container", "-l": "--selector", "-k": "--kustomize",
             "-f": "--filename", "-o": "--output", "-p": "--patch"}  # fmt: skip


def parse(words: list[str], assigned: dict[str, str] | None = None) -> Parsed:
    """kubectl's arguments: verb (with ``rollout``/``apply``/``create``/``set``'s sub-command), positionals
    and flags; everything after ``--`` is the pod's command. Variables in ``assigned`` are substituted,
    except in ``-n`` (a namespace variable stands for the namespaces the documents move objects to)."""
    args = words[1:]
    if assigned:
        args = [arg if previous in ("-n", "--namespace") or arg.startswith("--namespace=")
                else _substitute(arg, assigned) for previous, arg in zip(["", *args[:-1]], args, strict=True)]  # fmt: skip
    if "--" in args:
        args = args[: args.index("--")]
    verb, positionals, flags, i = "", [], {}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and len(arg) > 1:
            name, has_value, value = arg.partition("=")
            booleans = LOGS_BOOLEANS if verb == "logs" else set()
            if not has_value and name in VALUE_FLAGS and name not in booleans:
                value = args[i + 1] if i + 1 < len(args) else ""
                i += 1
            flags.setdefault(name if name in booleans else CANONICAL.get(name, name), []).append(value)
        elif not verb:
            verb = arg
        elif (
            verb in ("rollout", "apply", "create", "set", "auth", "config")
            and not positionals
            and (verb != "apply" or arg in ("edit-last-applied", "set-last-applied", "view-last-applied"))
        ):
            verb = f"{verb} {arg}"
        else:
            positionals.append(arg)
        i += 1
    return Parsed(verb, positionals, flags)


def _namespaces_set(index: list[Obj]) -> set[str]:
    return {obj.namespace for obj in index if obj.namespace}


def _reaches(obj: Obj, namespace: str | None, context: Context) -> bool:
    """Whether a command with ``-n namespace`` (None: no ``-n``) reaches the object."""
    if obj.namespace is None:
        return True  # goes where -n (or the context) points
    if namespace is None:
        return False  # the context's namespace, which the documents never set
    if "<" in namespace or re.fullmatch(r"[A-Z][A-Z0-9_]+", namespace):
        return True
    variable = re.fullmatch(r"\$\{?(\w+)\}?", namespace)
    if variable:
        name = variable.group(1)
        moved = context.moved.get(name, set())
        return obj.source in {m.removeprefix("manifests/") for m in moved} or obj.namespace == _default(
            name, context
        )
    return obj.namespace == namespace


def _default(name: str, context: Context) -> str | None:
    value = context.defaults.get(name)
    for _ in range(5):  # SERVING_NS=$NS
        inner = re.fullmatch(r"\$\{?(\w+)\}?", value or "")
        if not inner:
            break
        value = context.defaults.get(inner.group(1))
    return value


def _selector_matches(selector: str, labels: dict) -> bool:
    for term in selector.split(","):
        term = term.strip()
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _containers(obj: Obj) -> set[str]:
    """Container names of the object's pod templates, init containers included."""
    return {container["name"] for template in obj.pod_templates
            for container in (template["spec"].get("initContainers") or []) + template["spec"]["containers"]}  # fmt: skip


def _single_or_default(obj: Obj) -> str | None:
    """Problem when ``logs``/``exec`` without ``-c`` would pick a container by position."""
    for template in obj.pod_templates:
        containers = template["spec"]["containers"]
        annotations = (template.get("metadata") or {}).get("annotations") or {}
        if len(containers) > 1 and "kubectl.kubernetes.io/default-container" not in annotations:
            names = [c["name"] for c in containers]
            return f"{obj.kind}/{obj.name} has containers {names}: name one with -c"
    return None


def _references(parsed: Parsed) -> list[tuple[str, str]]:
    """``(type word, name)`` the command names (name ``""``: the type alone)."""
    verb, positionals = parsed.verb, parsed.positionals
    if verb in POD_VERBS:  # one target: TYPE/NAME, or a pod's NAME
        return [tuple(t.split("/", 1)) if "/" in t else ("pod", t) for t in positionals[:1]]
    if verb.startswith("rollout ") or verb == "apply edit-last-applied":  # TYPE/NAME or TYPE NAME
        if positionals[:1] and "/" in positionals[0]:
            return [tuple(positionals[0].split("/", 1))]
        return [tuple(positionals[:2])] if len(positionals) >= 2 else []
    if verb not in OBJECT_VERBS or parsed.flags.get("--kustomize") or parsed.flags.get("--filename"):
        return []
    if verb in ("annotate", "label"):
        positionals = [p for p in positionals if "=" not in p and not p.endswith("-")]
    if not positionals:
        return []
    if "/" in positionals[0]:
        return [tuple(p.split("/", 1)) for p in positionals if "/" in p]
    type_word, names = positionals[0], positionals[1:]
    if verb == "scale":
        names = names[:1]
    return [(type_word, name) for name in names] or [(type_word, "")]


def check_command(command: Command, index: list[Obj], context: Context, used: set) -> list[str]:
    """Problems of one documented command against the rendered objects; ``used`` collects allow-list hits."""
    parsed = parse(command.words, command.assigned)
    if parsed.verb.split(" ")[0] not in VERBS:
        return []  # prose: "kubectl refuses ..."
    problems: list[str] = []

    def problem(message: str):
        problems.append(f"{command.where}: `{command.text.strip()[:100]}`: {message}")

    namespaces = [n for n in parsed.flags.get("--namespace", []) if n]
    namespace = namespaces[-1] if namespaces else None
    if namespace and not _wild(namespace) and namespace not in _namespaces_set(index):
        problem(f"namespace {namespace!r} is set by no manifest (they set {sorted(_namespaces_set(index))})")

    # -k / -f paths
    for flag in ("--kustomize", "--filename"):
        for path in parsed.flags.get(flag, []):
            if path == "" and command.in_code:
                problem(f"{flag} names no path: an instruction must say which")
            if path in ("", "-"):
                continue  # `kubectl apply -k` named in prose; `-f -` reads stdin
            if path in USER_PATHS:
                used.add(("path", path))
                continue
            _check_path(path, flag, namespace, context, problem, parsed.verb)
    if parsed.verb == "kustomize" and parsed.positionals:
        _check_path(parsed.positionals[0], "--kustomize", None, context, problem)

    # the objects named
    targets: list[Obj] = []
    for type_word, name in _references(parsed):
        kind = KIND_OF.get(type_word.lower().split(".")[0])
        if kind is None:
            problem(f"unknown resource type {type_word!r}")
            continue
        if (kind, name) in RUNTIME_OBJECTS:
            used.add((kind, name))
            continue
        of_kind = [obj for obj in index if obj.kind == kind]
        if not of_kind:
            problem(f"no manifest creates a {kind}")
            continue
        if not name or "$" in name or re.fullmatch(r"[A-Z][A-Z0-9_]+", name):
            pattern = "*"  # the type alone, a variable or an UPPER_CASE placeholder: any name
        else:
            pattern = re.sub(r"<[^>]*>", "*", name)  # metarec-<method>-<hash>-master-0: parts match any text
        named = [obj for obj in of_kind if fnmatch.fnmatchcase(obj.name, pattern)]
        if not named:
            problem(f"no {kind} named {name!r} (there are {sorted({o.name for o in of_kind})})")
            continue
        reached = [obj for obj in named if _reaches(obj, namespace, context)]
        if not reached:
            where = sorted({o.namespace for o in named})
            problem(f"{kind}/{name} lives in {where}, which `-n {namespace}` does not reach")
            continue
        targets += reached

    # -l selectors
    for selector in parsed.flags.get("--selector", []):
        if not selector or _wild(selector):
            continue
        type_word = parsed.positionals[0] if parsed.positionals else "pods"
        kind = KIND_OF.get(type_word.split("/")[0].lower(), "Pod")
        if kind == "Pod" or parsed.verb in POD_VERBS:
            selected = [obj for obj in index if obj.kind != "Pod" and _reaches(obj, namespace, context)
                        and any(_selector_matches(selector, (t.get("metadata") or {}).get("labels") or {})
                                for t in obj.pod_templates)]  # fmt: skip
        else:
            selected = [obj for obj in index if obj.kind == kind and _reaches(obj, namespace, context)
                        and _selector_matches(selector, obj.labels)]  # fmt: skip
        if not selected:
            problem(f"-l {selector} selects no {'pod template' if kind == 'Pod' else kind} of the manifests")
        targets += selected if parsed.verb in POD_VERBS else []

    # containers
    workloads = [obj for obj in targets if obj.kind in WORKLOAD_KINDS and obj.pod_templates]
    containers = [c for c in parsed.flags.get("--container", []) if c and not _wild(c)]
    for container in containers:
        for obj in workloads:
            names = sorted(_containers(obj))
            if container not in names:
                problem(f"{obj.kind}/{obj.name} ({obj.source}) has no container {container!r}: {names}")
    if parsed.verb in ("logs", "exec", "attach") and not parsed.flags.get("--container"):
        for obj in workloads:
            if message := _single_or_default(obj):
                problem(message)

    # port-forward: the remote port is one the target exposes
    if parsed.verb == "port-forward":
        for spec in parsed.positionals[1:]:
            remote = spec.rsplit(":", 1)[-1]
            for obj in targets:
                ports = _ports(obj)
                if remote not in ports:
                    problem(f"{obj.kind}/{obj.name} has no port {remote} (its ports: {sorted(ports)})")

    # containers a jsonpath filter or a patch body names (a patch with an unknown name adds a container)
    for obj in workloads:
        for field, name in _named_containers(parsed):
            names = {c["name"] for t in obj.pod_templates for c in t["spec"].get(field) or []}
            if name not in names:
                problem(
                    f"{obj.kind}/{obj.name} ({obj.source}) has no {field} entry {name!r}: {sorted(names)}"
                )

    _check_creates(parsed, index, namespace, context, used, problem)
    return problems


def _named_containers(parsed: Parsed) -> list[tuple[str, str]]:
    """``(containers|initContainers, name)`` a ``-o jsonpath`` filter or a ``-p`` patch names."""
    import json

    named = []
    for output in parsed.flags.get("--output", []):
        named += re.findall(r"\b(containers|initContainers)\[\?\(@\.name==[\"']([^\"']+)[\"']\)\]", output)

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    named.extend(
                        (key, item["name"]) for item in value if isinstance(item, dict) and "name" in item
                    )
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for patch in parsed.flags.get("--patch", []):
        try:
            walk(json.loads(patch))
        except ValueError:
            pass  # a YAML or shell-built patch: not checked
    return named


def _ports(obj: Obj) -> set[str]:
    if obj.kind == "Service":
        return {str(p["port"]) for p in obj.raw["spec"]["ports"]} | {
            p.get("name", "") for p in obj.raw["spec"]["ports"]
        }
    return {str(port.get(key, "")) for t in obj.pod_templates for c in t["spec"]["containers"]
            for port in c.get("ports") or [] for key in ("containerPort", "name")}  # fmt: skip


def _check_path(path: str, flag: str, namespace, context: Context, problem, verb: str = "") -> None:
    """A ``-k``/``-f`` path exists (``<x>`` matches any name), renders, and pins no namespace ``-n`` lacks."""
    pattern = re.sub(r"<[^>]*>", "*", path).rstrip("/")
    if "$" in pattern or re.fullmatch(r"[A-Z][A-Z0-9_]+", pattern):
        return  # a variable the document never assigns (e.g. DIR): nothing to check
    matches = sorted(glob.glob(str(REPO / pattern)))
    if not matches:
        problem(f"{flag} {path}: no such path in the repository")
        return
    for match in matches:
        target = Path(match)
        if flag == "--kustomize":
            if not (target / "kustomization.yaml").is_file():
                problem(f"-k {target.relative_to(REPO)}: no kustomization.yaml there")
                continue
            objects = list(render(str(target.relative_to(MANIFESTS))))
        elif target.is_dir():
            objects = [
                doc for f in sorted(target.glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text()) if doc
            ]
        else:
            objects = [doc for doc in yaml.safe_load_all(target.read_text()) if doc]
        if flag == "--kustomize" and verb == "delete":
            # `delete -k` deletes every object the folder renders, those of the kustomizations it includes too:
            # one the documents apply on their own (e.g. the training account) is in use elsewhere.
            own = target.relative_to(MANIFESTS).as_posix()
            for shared in sorted(_includes(own) & context.applied):
                names = [f"{o['kind']}/{o['metadata']['name']}" for o in render(shared)]
                problem(
                    f"delete -k {own} also deletes {names} of {shared}, which the documents apply on their own"
                )
        if namespace is None:
            continue
        relative = target.relative_to(REPO).as_posix()
        pinned = {o["metadata"].get("namespace") for o in objects} - {None}
        variable = re.fullmatch(r"\$\{?(\w+)\}?", namespace)
        moved = variable and relative in context.moved.get(variable.group(1), set())
        if pinned and not moved and (_wild(namespace) and not variable or pinned != {namespace}):
            problem(f"{relative} pins namespace {sorted(pinned)}: kubectl refuses it with -n {namespace}")


def _secret_keys(index: list[Obj]) -> dict[str, set[str]]:
    """Secret name -> keys read (``""``: the whole Secret, envFrom or a volume)."""
    keys: dict[str, set[str]] = {}
    for obj in index:
        for template in obj.pod_templates:
            spec = template["spec"]
            for volume in spec.get("volumes") or []:
                if "secret" in volume:
                    keys.setdefault(volume["secret"]["secretName"], set()).add("")
            for container in (spec.get("initContainers") or []) + spec["containers"]:
                for env in container.get("env") or []:
                    ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        keys.setdefault(ref["name"], set()).add(ref["key"])
                for source in container.get("envFrom") or []:
                    if "secretRef" in source:
                        keys.setdefault(source["secretRef"]["name"], set()).add("")
    return keys


def _namespace_selectors(node) -> list[dict]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "namespaceSelector" and isinstance(value, dict):
                found.append(value.get("matchLabels") or {})
            found += _namespace_selectors(value)
    elif isinstance(node, list):
        for item in node:
            found += _namespace_selectors(item)
    return found


def _check_creates(parsed: Parsed, index, namespace, context, used, problem) -> None:
    """``create namespace/secret/rolebinding`` and ``label namespace``: what they make is what the
    manifests use."""
    verb, positionals = parsed.verb, parsed.positionals
    if verb == "create namespace" and positionals and not _wild(positionals[0]):
        if positionals[0] not in _namespaces_set(index):
            problem(f"namespace {positionals[0]!r} is set by no manifest")
    if verb == "create secret" and len(positionals) >= 2 and not _wild(positionals[1]):
        name = positionals[1]
        if name in USER_SECRETS:
            used.add(("secret", name))
        else:
            read = _secret_keys([obj for obj in index if _reaches(obj, namespace, context)])
            if name not in read:
                problem(f"no workload reads Secret {name!r} (they read {sorted(read)})")
            else:
                given = [v.split("=", 1)[0] for v in parsed.flags.get("--from-literal", [])]
                given += [
                    Path(v.split("=", 1)[0] if "=" in v else v).name
                    for v in parsed.flags.get("--from-file", [])
                ]
                missing = read[name] - {""} - set(given)
                if missing:
                    problem(f"Secret {name} lacks the key(s) {sorted(missing)} the workloads read")
    if verb == "create rolebinding":
        for role in parsed.flags.get("--role", []):
            if not [o for o in index if o.kind == "Role" and o.name == role]:
                problem(f"no Role named {role!r}")
        for account in parsed.flags.get("--serviceaccount", []):
            name = account.split(":")[-1]
            if ("ServiceAccount", name) in RUNTIME_OBJECTS:
                used.add(("ServiceAccount", name))
            elif not [o for o in index if o.kind == "ServiceAccount" and o.name == name]:
                problem(f"no ServiceAccount named {name!r}")
    if verb == "label" and positionals[:1] and KIND_OF.get(positionals[0].lower()) == "Namespace":
        selectors = [s for obj in index for s in _namespace_selectors(obj.raw)]
        for pair in [p for p in positionals if "=" in p]:
            key, value = pair.split("=", 1)
            if key in EXTERNAL_NAMESPACE_LABELS:
                used.add(("label", key))
            elif not [s for s in selectors if s.get(key) == value]:
                problem(f"no namespaceSelector of the manifests selects {pair}")
