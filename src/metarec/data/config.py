"""Declarative data-set layout: which files hold ratings, users and items, and how to read them.

A data-set config is a small YAML file (schema in docs/ARCHITECTURE.md). Shipped configs live in
``metarec/configs/datasets/`` and are referred to by name (``movielens-100k``, ``movielens-csv``, ``synthetic``).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "datasets"

FEATURE_KINDS = ("categorical", "hashed", "multi_hot", "numeric", "text")
PARSERS = ("date_year", "title_year")
TEXT_ENCODERS = ("ngrams", "sentence")
DEFAULT_TEXT_DIM = 32
FILE_FORMATS = ("csv", "parquet")
ID_TYPES = ("integer", "string")
# Columns metarec itself writes beside the features (loaders.RawData, preprocessing's users.parquet and
# items.parquet): a feature of that name would overwrite them (or be overwritten) without a word.
RESERVED_FEATURE_NAMES = {
    "users": ("user_id", "user_idx", "user_split"),
    "items": ("item_id", "item_idx", "warm_idx", "is_cold", "release"),
}


@dataclass(frozen=True)
class FeatureSpec:
    """One user or item feature as declared in the config.

    Attributes:
        name: feature name (also the raw column name in users.parquet / items.parquet).
        kind: ``categorical`` | ``hashed`` | ``multi_hot`` | ``numeric`` | ``text``.
        column: source column (all kinds except multi_hot given as flag columns).
        columns: 0/1 flag columns of a multi_hot feature, or the text columns of a text feature.
        labels: label of each flag column (defaults to the column names).
        sep: separator of a multi_hot feature stored as one joined column.
        parse: ``date_year`` ("01-Jan-1995" -> 1995) or ``title_year`` ("Toy Story (1995)" -> 1995).
        buckets: number of hash buckets of a hashed feature.
        tags: a text feature also reads the data set's ``tags`` table (user-applied tags per item).
        dim: width of a text feature's dense vector (numeric columns the model sees).
        encoder: a text feature's encoder: ``ngrams`` (hashed word + char n-grams, TF-IDF and a
            truncated SVD fitted on training items; no download) or ``sentence`` (a pretrained
            sentence-transformers model read from ``model``).
        model: local folder or ``gs://`` prefix of the sentence-embedding model.
    """

    name: str
    kind: str
    column: str | None = None
    columns: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    sep: str | None = None
    parse: str | None = None
    buckets: int | None = None
    tags: bool = False
    dim: int | None = None
    encoder: str | None = None
    model: str | None = None

    def source_columns(self) -> tuple[str, ...]:
        """Returns the raw table columns this feature reads."""
        return self.columns if self.columns else ((self.column,) if self.column else ())


@dataclass(frozen=True)
class TableConfig:
    """How to read one delimited (or Parquet) file.

    Attributes:
        file: file name relative to the data directory.
        sep: field separator: one character, or a literal string such as ``::`` (not a regex).
        header: True when the first row names the columns.
        encoding: text encoding.
        names: column names when ``header`` is false.
        format: ``csv`` (any delimited text) or ``parquet``; inferred from the file suffix by default.
        quote: a field may be quoted (``"a, b"``, ``""`` for a quote inside), as Python's csv module
            and spreadsheets write it; None (the default) means on when ``sep`` is ``,`` only, so a
            bare ``"`` in a tab- or ``|``-separated field stays text. One-character separators only.
    """

    file: str
    sep: str = ","
    header: bool = False
    encoding: str = "utf-8"
    names: tuple[str, ...] = ()
    format: str = "csv"
    quote: bool | None = None

    def __post_init__(self) -> None:
        if self.quote is None:  # frozen: resolve the default once, so readers just read .quote
            object.__setattr__(self, "quote", self.sep == ",")


@dataclass(frozen=True)
class RatingsConfig(TableConfig):
    """The ratings table: which column is the user, the item, the rating and the time.

    Attributes:
        user: user id column.
        item: item id column.
        rating: rating column.
        timestamp: optional timestamp column (unix seconds).
        rating_scale: inclusive (min, max) of allowed ratings.
        rating_step: allowed rating granularity (1.0 whole stars, 0.5 half stars).
        id_type: ``integer`` (ids are numbers: ``01`` and ``1`` are the same id) or ``string`` (ids
            such as ``u1`` or an Amazon ASIN are kept verbatim, stripped of surrounding spaces). Applies
            to the user and item ids of every table (ratings, users, items, tags), which join on them.
    """

    user: str = "user_id"
    item: str = "item_id"
    rating: str = "rating"
    timestamp: str | None = None
    rating_scale: tuple[float, float] = (1.0, 5.0)
    rating_step: float = 1.0
    id_type: str = "integer"


@dataclass(frozen=True)
class TagsConfig(TableConfig):
    """The optional tags table: free-text tags that users applied to items (MovieLens ``tags.csv``).

    Attributes:
        user: user id column.
        item: item id column.
        tag: tag text column.
    """

    user: str = "user_id"
    item: str = "item_id"
    tag: str = "tag"


@dataclass(frozen=True)
class DisplaySpec:
    """One catalogue field shown to people (written to ``items.parquet`` as ``display_<name>``).

    Attributes:
        name: display field name.
        column: raw items-table column to show as text, or
        feature: item feature whose raw value to show (a multi_hot feature shows its labels).
    """

    name: str
    column: str | None = None
    feature: str | None = None


@dataclass(frozen=True)
class EntityConfig(TableConfig):
    """A users or items table.

    Attributes:
        id: id column (joins the ratings' user or item column).
        features: declared features.
    """

    id: str = "id"
    features: tuple[FeatureSpec, ...] = ()


@dataclass(frozen=True)
class DatasetConfig:
    """A whole data-set layout.

    Attributes:
        name: data-set name (recorded in schema.json).
        ratings: the ratings table.
        items: the items table.
        users: the users table, or None when the data set has no user features.
        tags: the tags table, or None when the data set ships none.
        display: catalogue fields shown to people, in order.
        source: where the config was read from (for error messages).
    """

    name: str
    ratings: RatingsConfig
    items: EntityConfig
    users: EntityConfig | None = None
    tags: TagsConfig | None = None
    display: tuple[DisplaySpec, ...] = ()
    source: str = "<dict>"


def _err(source: str, where: str, message: str) -> ValueError:
    return ValueError(f"dataset config {source}: {where}: {message}")


def _as_bool(value: Any, source: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _err(source, where, f"expected true/false, got {value!r}")


def _number(value: Any, source: str, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _err(source, where, f"expected a number, got {value!r}")


def _scalar(value: Any, source: str, where: str) -> str | None:
    """A column name as text (YAML reads ``1`` as a number); None when absent."""
    if value is None:
        return None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    raise _err(source, where, f"expected a column name, got {value!r}")


def _names(value: Any, source: str, where: str) -> tuple[str, ...]:
    """A list of column names; a bare string would otherwise be read as a list of its characters."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise _err(source, where, f"expected a list of column names, got {value!r}")
    return tuple(_scalar(v, source, f"{where}[{i}]") for i, v in enumerate(value))


def _table_kwargs(raw: dict, section: str, source: str, allowed_extra: set[str]) -> dict:
    if not isinstance(raw, dict):
        raise _err(source, section, f"expected a mapping, got {type(raw).__name__}")
    allowed = {"file", "sep", "header", "encoding", "names", "format", "quote"} | allowed_extra
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _err(source, section, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    if not raw.get("file") or not isinstance(raw["file"], str):
        raise _err(source, f"{section}.file", "a file name is required")
    header = _as_bool(raw.get("header", False), source, f"{section}.header")
    names = _names(raw.get("names"), source, f"{section}.names")
    fmt = raw.get("format") or ("parquet" if raw["file"].endswith((".parquet", ".pq")) else "csv")
    if fmt not in FILE_FORMATS:
        raise _err(source, f"{section}.format", f"expected one of {FILE_FORMATS}, got {fmt!r}")
    if fmt == "csv" and not header and not names:
        raise _err(source, f"{section}.names", "column names are required when header is false")
    if names and (header or fmt == "parquet"):  # the reader would ignore them without a word
        raise _err(
            source,
            f"{section}.names",
            "only a CSV without a header row takes names; this file names its columns",
        )
    sep = str(raw.get("sep", ","))
    if not sep:
        raise _err(source, f"{section}.sep", "the separator must not be empty")
    if len(sep) > 1 and any(c in sep for c in "\\+*[]?"):  # pandas would take these as a regex; we don't
        raise _err(
            source, f"{section}.sep", f"{sep!r} looks like a regular expression; a sep is literal text"
        )
    encoding = str(raw.get("encoding", "utf-8"))
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise _err(source, f"{section}.encoding", f"unknown text encoding {encoding!r}") from None
    quote = _as_bool(raw["quote"], source, f"{section}.quote") if raw.get("quote") is not None else None
    if quote and len(sep) > 1:
        raise _err(source, f"{section}.quote", f"quoted fields need a one-character sep, got {sep!r}")
    return {
        "file": raw["file"],
        "sep": sep,
        "quote": quote,
        "header": header,
        "encoding": encoding,
        "names": names,
        "format": fmt,
    }


def _check_column(column: str | None, names: tuple[str, ...], source: str, where: str) -> None:
    if column is not None and names and column not in names:
        raise _err(source, where, f"column {column!r} is not among the declared names {list(names)}")


def _feature(raw: Any, section: str, index: int, names: tuple[str, ...], source: str) -> FeatureSpec:
    where = f"{section}.features[{index}]"
    if not isinstance(raw, dict):
        raise _err(source, where, f"expected a mapping, got {raw!r}")
    allowed = {"name", "kind", "column", "columns", "labels", "sep", "parse", "buckets"}
    if raw.get("kind") == "text":
        allowed = {"name", "kind", "column", "columns", "tags", "dim", "encoder", "model"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _err(source, where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    name, kind = raw.get("name"), raw.get("kind")
    if not name or not isinstance(name, str):
        raise _err(source, where, "a feature name is required")
    if kind not in FEATURE_KINDS:
        raise _err(source, where, f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
    column = _scalar(raw.get("column"), source, f"{where}.column")
    columns = _names(raw.get("columns"), source, f"{where}.columns")
    labels = _names(raw.get("labels"), source, f"{where}.labels")
    parse = raw.get("parse")
    buckets = raw.get("buckets")
    if kind == "multi_hot":
        if bool(columns) == bool(column):
            raise _err(source, where, "a multi_hot feature needs either 'columns' (0/1 flags) or 'column'")
        if labels and len(labels) != len(columns):
            raise _err(source, where, f"{len(labels)} labels for {len(columns)} flag columns")
        if columns and not labels:
            labels = columns
        if any("|" in label for label in labels):  # labels are stored joined by "|"
            raise _err(source, f"{where}.labels", f"a label must not contain '|', got {list(labels)}")
        if raw.get("sep") is not None and not (isinstance(raw["sep"], str) and raw["sep"]):
            raise _err(source, f"{where}.sep", f"expected a non-empty separator, got {raw['sep']!r}")
    elif kind == "text":
        return _text_feature(raw, where, names, source)
    elif not column:
        raise _err(source, where, f"a {kind} feature needs 'column'")
    if parse is not None and (kind != "numeric" or parse not in PARSERS):
        raise _err(source, where, f"'parse' must be one of {PARSERS} on a numeric feature, got {parse!r}")
    if kind == "hashed":
        if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 1:
            raise _err(source, where, f"a hashed feature needs 'buckets' >= 1, got {buckets!r}")
    elif buckets is not None:
        raise _err(source, where, "'buckets' only applies to hashed features")
    for col in columns or (column,):
        _check_column(col, names, source, where)
    return FeatureSpec(
        name=name,
        kind=kind,
        column=column,
        columns=columns,
        labels=labels,
        sep=str(raw["sep"]) if raw.get("sep") is not None else ("|" if kind == "multi_hot" else None),
        parse=parse,
        buckets=buckets,
    )


def _text_feature(raw: dict, where: str, names: tuple[str, ...], source: str) -> FeatureSpec:
    column = _scalar(raw.get("column"), source, f"{where}.column")
    columns = _names(raw.get("columns"), source, f"{where}.columns")
    if column and columns:
        raise _err(source, where, "a text feature takes 'column' or 'columns', not both")
    columns = columns or ((str(column),) if column else ())
    tags = _as_bool(raw.get("tags", False), source, f"{where}.tags")
    if not columns and not tags:
        raise _err(source, where, "a text feature needs text 'columns' and/or 'tags: true'")
    dim = raw.get("dim", DEFAULT_TEXT_DIM)
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise _err(source, f"{where}.dim", f"expected an integer >= 1, got {dim!r}")
    encoder = raw.get("encoder", "ngrams")
    if encoder not in TEXT_ENCODERS:
        raise _err(source, f"{where}.encoder", f"expected one of {TEXT_ENCODERS}, got {encoder!r}")
    model = raw.get("model")
    if (encoder == "sentence") != bool(model):
        raise _err(
            source,
            f"{where}.model",
            "a local path or gs:// URI is required with (only with) encoder: sentence",
        )
    for col in columns:
        _check_column(col, names, source, where)
    return FeatureSpec(
        name=str(raw["name"]), kind="text", columns=columns, tags=tags, dim=dim, encoder=encoder,
        model=str(model) if model else None,
    )  # fmt: skip


def _tags(raw: Any, source: str) -> TagsConfig:
    kwargs = _table_kwargs(raw, "tags", source, {"user", "item", "tag"})
    for key in ("user", "item", "tag"):
        if not raw.get(key):
            raise _err(source, f"tags.{key}", "the column name is required")
        _check_column(_scalar(raw[key], source, f"tags.{key}"), kwargs["names"], source, f"tags.{key}")
    _distinct_columns(raw, ("user", "item", "tag"), "tags", source)
    return TagsConfig(user=str(raw["user"]), item=str(raw["item"]), tag=str(raw["tag"]), **kwargs)


def _distinct_columns(raw: dict, keys: tuple[str, ...], section: str, source: str) -> None:
    """Each role needs its own column (one column read twice fails deep in the CSV reader)."""
    seen: dict[str, str] = {}
    for key in keys:
        column = raw.get(key)
        if not column:
            continue
        if str(column) in seen:
            raise _err(
                source,
                f"{section}.{key}",
                f"column {column!r} is already {section}.{seen[str(column)]}; each needs its own column",
            )
        seen[str(column)] = key


def _display(raw: Any, items: EntityConfig, source: str) -> tuple[DisplaySpec, ...]:
    if not isinstance(raw, list):
        raise _err(source, "display", f"expected a list of {{name, column | feature}}, got {raw!r}")
    features = {spec.name for spec in items.features}
    out: list[DisplaySpec] = []
    for index, entry in enumerate(raw):
        where = f"display[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "column", "feature"}:
            raise _err(source, where, f"expected a mapping with name and column or feature, got {entry!r}")
        name, column, feature = entry.get("name"), entry.get("column"), entry.get("feature")
        if not name or not isinstance(name, str):
            raise _err(source, where, "a display name is required")
        if bool(column) == bool(feature):
            raise _err(source, where, "give either 'column' (an items-table column) or 'feature'")
        if feature and feature not in features:
            raise _err(source, where, f"feature {feature!r} is not an item feature ({sorted(features)})")
        _check_column(column, items.names, source, where)
        if name in {d.name for d in out}:
            raise _err(source, where, f"duplicate display name {name!r}")
        out.append(DisplaySpec(name=name, column=column, feature=feature))
    return tuple(out)


def _entity(raw: dict, section: str, source: str) -> EntityConfig:
    kwargs = _table_kwargs(raw, section, source, {"id", "features"})
    if not raw.get("id"):
        raise _err(source, f"{section}.id", "the id column is required")
    _check_column(raw["id"], kwargs["names"], source, f"{section}.id")
    listed = raw.get("features") or []
    if not isinstance(listed, list):
        raise _err(source, f"{section}.features", f"expected a list of features, got {listed!r}")
    features = tuple(_feature(f, section, i, kwargs["names"], source) for i, f in enumerate(listed))
    seen: set[str] = set()
    # A text feature's vectors go to items.parquet as <name>_vector (features.vector_column).
    vectors = {f"{spec.name}_vector" for spec in features if spec.kind == "text"}
    for index, spec in enumerate(features):
        if spec.name in seen:
            raise _err(source, f"{section}.features", f"duplicate feature name {spec.name!r}")
        seen.add(spec.name)
        if (
            spec.name in RESERVED_FEATURE_NAMES.get(section, ())
            or spec.name in vectors
            or (section == "items" and spec.name.startswith("display_"))
        ):
            raise _err(
                source,
                f"{section}.features[{index}]",
                f"feature name {spec.name!r} is a column metarec writes itself; choose another name",
            )
    return EntityConfig(id=str(raw["id"]), features=features, **kwargs)


def parse_dataset_config(raw: dict, source: str = "<dict>") -> DatasetConfig:
    """Validates a config mapping (as read from YAML).

    Args:
        raw: the mapping.
        source: where it came from, quoted in error messages.

    Returns:
        The DatasetConfig.

    Raises:
        ValueError: on a missing or unknown key or an inconsistent setting, naming the key.
    """
    if not isinstance(raw, dict):
        raise _err(source, "top level", f"expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"name", "ratings", "users", "items", "tags", "display"})
    if unknown:
        raise _err(source, "top level", f"unknown key(s) {unknown}")
    for key in ("ratings", "items"):
        if key not in raw:
            raise _err(source, key, "section is required")
    rr = raw["ratings"]
    kwargs = _table_kwargs(
        rr,
        "ratings",
        source,
        {"user", "item", "rating", "timestamp", "rating_scale", "rating_step", "id_type"},
    )
    for key in ("user", "item", "rating"):
        if not rr.get(key):
            raise _err(source, f"ratings.{key}", "the column name is required")
        _check_column(_scalar(rr[key], source, f"ratings.{key}"), kwargs["names"], source, f"ratings.{key}")
    timestamp = _scalar(rr.get("timestamp"), source, "ratings.timestamp")
    _check_column(timestamp, kwargs["names"], source, "ratings.timestamp")
    _distinct_columns(rr, ("user", "item", "rating", "timestamp"), "ratings", source)
    scale = rr.get("rating_scale", [1, 5])
    if not (isinstance(scale, list | tuple) and len(scale) == 2):
        raise _err(source, "ratings.rating_scale", f"expected [min, max] with min < max, got {scale!r}")
    scale = [_number(bound, source, "ratings.rating_scale") for bound in scale]
    if scale[0] >= scale[1]:
        raise _err(source, "ratings.rating_scale", f"expected [min, max] with min < max, got {scale!r}")
    step = _number(rr.get("rating_step", 1.0), source, "ratings.rating_step")
    if step <= 0:
        raise _err(source, "ratings.rating_step", f"must be > 0, got {step}")
    id_type = rr.get("id_type", "integer")
    if id_type not in ID_TYPES:
        raise _err(source, "ratings.id_type", f"expected one of {ID_TYPES}, got {id_type!r}")
    ratings = RatingsConfig(
        user=str(rr["user"]),
        item=str(rr["item"]),
        rating=str(rr["rating"]),
        timestamp=str(rr["timestamp"]) if rr.get("timestamp") else None,
        rating_scale=(float(scale[0]), float(scale[1])),
        rating_step=step,
        id_type=id_type,
        **kwargs,
    )
    users = _entity(raw["users"], "users", source) if raw.get("users") else None
    items = _entity(raw["items"], "items", source)
    tags = _tags(raw["tags"], source) if raw.get("tags") else None
    for index, spec in enumerate(items.features):
        if spec.tags and tags is None:
            raise _err(source, f"items.features[{index}]", "tags: true needs a top-level 'tags' table")
    if users is not None and any(spec.kind == "text" for spec in users.features):
        raise _err(source, "users.features", "text features are item content; users cannot have them")
    return DatasetConfig(
        name=str(raw.get("name") or Path(source).stem),
        ratings=ratings,
        items=items,
        users=users,
        tags=tags,
        display=_display(raw.get("display") or [], items, source),
        source=source,
    )


def shipped_config_names() -> list[str]:
    """Returns the names of the configs shipped in ``metarec/configs/datasets``."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def dataset_config_location(path_or_name: str) -> str:
    """Where a config is read from: a shipped config's file for its name, else the path or URI as given."""
    shipped = CONFIGS_DIR / f"{path_or_name}.yaml"
    return str(shipped) if "/" not in path_or_name and shipped.is_file() else path_or_name


def load_dataset_config(path_or_name: str | Path | dict | DatasetConfig) -> DatasetConfig:
    """Loads a data-set config.

    Args:
        path_or_name: a YAML file path or ``gs://`` URI, the name of a shipped config
            (``movielens-100k``, ``movielens-csv``, ``synthetic``), a mapping, or a DatasetConfig
            (returned as is).

    Returns:
        The validated DatasetConfig.

    Raises:
        ValueError: unknown name, missing file, invalid YAML or an invalid setting.
    """
    if isinstance(path_or_name, DatasetConfig):
        return path_or_name
    if isinstance(path_or_name, dict):
        return parse_dataset_config(path_or_name)
    text_path = str(path_or_name)
    if text_path.startswith("gs://"):
        from metarec import storage  # lazy: only gs:// configs need the storage client

        return _parse_yaml_text(storage.read_bytes(text_path).decode("utf-8"), text_path)
    path = Path(dataset_config_location(text_path))
    if not path.is_file():
        raise ValueError(
            f"dataset config {text_path!r}: no such file and not a shipped config "
            f"(shipped: {shipped_config_names()})"
        )
    return _parse_yaml_text(path.read_text(encoding="utf-8"), str(path))


def _parse_yaml_text(text: str, source: str) -> DatasetConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"dataset config {source}: invalid YAML: {exc}") from exc
    return parse_dataset_config(raw, source=source)
