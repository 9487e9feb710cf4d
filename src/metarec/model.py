"""The preference model: a MeLU-style network that predicts one user's ratings of items.

User and item features are embedded and concatenated (the *encoder*), then a small MLP (the
*decoder*, MeLU's "decision layers") maps the pair to a rating. The item catalogue (encoded item
features and the warm-item index) is stored as buffers, so a saved model carries everything it needs
to score items by index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metarec.features import EncodedFeatures, FeatureDims
from metarec.settings import Settings

ADAPT_MODES = ("all", "decision", "head")
# Per-user parameters every adapt mode adapts (when the model has them), in this order.
USER_PARAMETERS = ("user_bias", "user_factors")
MODEL_FILE = "model.pt"
MODEL_JSON = "model.json"


class FeatureEmbedder(nn.Module):
    """Embeds one entity type's encoded features into a flat vector.

    One ``nn.Embedding`` per categorical/hashed slot, one linear layer for the multi-hot block and one
    for the numeric block (blocks of width 0 get no layer). Works on any leading shape.

    Args:
        dims: sizes of the encoded features.
        embed_dim: width of each slot's embedding.
    """

    def __init__(self, dims: FeatureDims, embed_dim: int):
        super().__init__()
        self.cat = nn.ModuleList(nn.Embedding(int(size), embed_dim) for size in dims.cat_sizes)
        self.multi = nn.Linear(dims.n_multi, embed_dim, bias=False) if dims.n_multi > 0 else None
        self.num = nn.Linear(dims.n_num, embed_dim) if dims.n_num > 0 else None
        self.out_dim = embed_dim * (len(self.cat) + (self.multi is not None) + (self.num is not None))

    def forward(self, cat: torch.Tensor, num: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
        """Embeds features.

        Args:
            cat: Long[..., C] categorical slots.
            num: Float[..., D] numeric features.
            multi: Float[..., M] multi-hot features.

        Returns:
            Float[..., out_dim] concatenated embeddings.
        """
        parts = [embedding(cat[..., slot]) for slot, embedding in enumerate(self.cat)]
        if self.multi is not None:
            # Average over active labels so items with many genres are not scaled up.
            parts.append(self.multi(multi) / multi.sum(-1, keepdim=True).clamp(min=1.0))
        if self.num is not None:
            parts.append(self.num(num))
        if not parts:  # no features of this entity type (e.g. a data set without a user file)
            return num.new_zeros(*num.shape[:-1], 0)
        return torch.cat(parts, dim=-1)


class PreferenceEncoder(nn.Module):
    """Turns (user features, item indices) into the decoder's input rows; holds the item catalogue."""

    def __init__(
        self,
        user_dims: FeatureDims,
        item_dims: FeatureDims,
        n_warm_items: int,
        item_features: EncodedFeatures,
        item_warm_idx: torch.Tensor,
        embed_dim: int,
    ):
        super().__init__()
        self.user = FeatureEmbedder(user_dims, embed_dim)
        self.item = FeatureEmbedder(item_dims, embed_dim)
        # Row 0 is the "unknown id" used by cold items: a learned fallback.
        self.item_id = nn.Embedding(n_warm_items + 1, embed_dim)
        self.register_buffer("item_cat", item_features.cat.long().clone())
        self.register_buffer("item_num", item_features.num.float().clone())
        self.register_buffer("item_multi", item_features.multi.float().clone())
        self.register_buffer("item_warm_idx", item_warm_idx.long().clone())
        self.out_dim = self.user.out_dim + self.item.out_dim + embed_dim

    def forward(
        self,
        user_cat: torch.Tensor,
        user_num: torch.Tensor,
        user_multi: torch.Tensor,
        items: torch.Tensor,
        split: bool = False,
        warm_idx: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Builds decoder inputs for users and their items.

        Args:
            user_cat: Long[..., C] categorical user features.
            user_num: Float[..., D] numeric user features.
            user_multi: Float[..., M] multi-hot user features.
            items: Long[..., N] item indices (same leading shape as the user tensors).
            split: return the user part and the item part separately instead of concatenated rows.
            warm_idx: Long[..., N] the items' warm indices to use instead of the catalogue's (0 hides
                an item's id, as for a cold item: id dropout in training).

        Returns:
            Float[..., N, out_dim] one row per (user, item) pair: [user part, item part]; with
            ``split``: (Float[..., user_dim], Float[..., N, out_dim - user_dim]).
        """
        user_vec = self.user(user_cat, user_num, user_multi)
        item_vec = self.item(self.item_cat[items], self.item_num[items], self.item_multi[items])
        id_vec = self.item_id(self.item_warm_idx[items] if warm_idx is None else warm_idx)
        if split:
            return user_vec, torch.cat([item_vec, id_vec], dim=-1)
        user_rows = user_vec.unsqueeze(-2).expand(*item_vec.shape[:-1], user_vec.shape[-1])
        return torch.cat([user_rows, item_vec, id_vec], dim=-1)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Settings):
    """The model's architecture and rating range: everything but the data's sizes and catalogue.

    Attributes:
        embed_dim: width of every feature embedding.
        hidden: widths of the decoder's hidden layers.
        rating_min: lowest rating; predictions never go below it.
        rating_max: highest rating; predictions never go above it.
        item_bias: add a learned per-item offset (warm id; row 0 for cold items) to the decoder's output,
            outside the adapted layers, so item quality is learned directly and kept while adapting.
        learn_inner_lr: give every decoder tensor a meta-learned log-scale of the inner learning rate
            (per-layer learning rates as in MAML++; the inner loop multiplies its lr by ``exp(scale)``).
        user_bias: add a per-user logit offset ``user_bias`` (a scalar whose meta-learned value is the
            prior); every adapt mode adapts it, so a new user's rating level is fitted from the support
            rows first (what MF fold-in solves in closed form).
        user_bias_lr: the user bias's inner learning rate as a multiple of the inner lr (the scalar
            tolerates, and needs, a much larger step than the decoder weights to converge in few steps).
        user_bias_prior: when set, each inner step moves the user terms (bias and factors) by a damped
            Gauss-Newton step on the support MSE plus ``prior / n_support * (bias - initial bias)^2``
            (a MAP fit with ``prior`` pseudo-ratings at the meta-learned value, as MF fold-in's ridge),
            instead of SGD.
        user_factors: width F of a per-user latent vector (0 = none). Its meta-learned value is the
            prior; every adapt mode adapts it with the user bias, and the logit gains
            ``user_factors . item_factors[item]`` (matrix factorisation's interaction term, with item
            factors meta-learned per warm item; row 0 for cold items).
        user_factor_prior: the Gauss-Newton prior of the user factors in pseudo-ratings (None: the
            same as ``user_bias_prior``).
        item_content: also derive the item bias and item factors from the item's features (a linear map
            of :meth:`PreferenceModel.content_design`, added to the id rows), so a cold item (id row 0)
            gets its own bias and factors from what it is, as in LightFM: the user factors then rank
            cold items too. Training starts it at a ridge fit of the warm items' id rows on their features.
    """

    section = "model"
    embed_dim: int = 32
    hidden: tuple[int, ...] = (64, 64)
    rating_min: float = 1.0
    rating_max: float = 5.0
    item_bias: bool = True
    learn_inner_lr: bool = False
    user_bias: bool = False
    user_bias_lr: float = 1.0
    user_bias_prior: float | None = None
    user_factors: int = 0
    user_factor_prior: float | None = None
    item_content: bool = False

    def validate(self) -> None:
        """Refuses sizes that cannot build a model."""
        if self.embed_dim < 1:
            raise ValueError(f"model settings: embed_dim must be >= 1, got {self.embed_dim!r}")
        if self.user_factors < 0:
            raise ValueError(f"user_factors must be >= 0, got {self.user_factors!r}")
        if self.rating_max <= self.rating_min:
            raise ValueError(f"model settings: rating_max must exceed rating_min, got {self.rating_max!r}")


class PreferenceModel(nn.Module):
    """MeLU-style rating model for one user at a time (vmap it over tasks).

    Args:
        user_dims: sizes of the encoded user features.
        item_dims: sizes of the encoded item features.
        n_warm_items: number of items with a learned id embedding (warm_idx 1..n_warm_items).
        item_features: encoded features of every item (row = item_idx), kept as buffers.
        item_warm_idx: Long[n_items] warm index per item (0 = cold / unknown id).
        config: the architecture (None: ``ModelConfig()``'s defaults).
        **overrides: :class:`ModelConfig` fields to change (e.g. ``hidden=(16, 8)``); unknown names
            raise ValueError.
    """

    def __init__(
        self,
        user_dims: FeatureDims,
        item_dims: FeatureDims,
        n_warm_items: int,
        item_features: EncodedFeatures,
        item_warm_idx: torch.Tensor,
        config: ModelConfig | None = None,
        **overrides: Any,
    ):
        super().__init__()
        config = ModelConfig.from_dict({**(config or ModelConfig()).to_dict(), **overrides})
        self.settings = config
        self.user_dims = FeatureDims(list(user_dims.cat_sizes), int(user_dims.n_num), int(user_dims.n_multi))
        self.item_dims = FeatureDims(list(item_dims.cat_sizes), int(item_dims.n_num), int(item_dims.n_multi))
        self.n_warm_items = int(n_warm_items)
        self.n_items = int(item_warm_idx.shape[0])
        self.embed_dim = config.embed_dim
        self.hidden = config.hidden
        self.rating_min = config.rating_min
        self.rating_max = config.rating_max
        self.encoder = PreferenceEncoder(
            self.user_dims, self.item_dims, self.n_warm_items, item_features, item_warm_idx, self.embed_dim
        )
        layers: list[nn.Module] = []
        width = self.encoder.out_dim
        for size in self.hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.decoder = nn.Sequential(*layers)
        self.item_bias = nn.Embedding(self.n_warm_items + 1, 1) if config.item_bias else None
        if self.item_bias is not None:
            nn.init.zeros_(self.item_bias.weight)
        self.user_bias = nn.Parameter(torch.zeros(())) if config.user_bias else None
        self.user_bias_lr = config.user_bias_lr
        self.user_bias_prior = config.user_bias_prior
        self.n_user_factors = config.user_factors
        self.user_factors = nn.Parameter(torch.zeros(self.n_user_factors)) if self.n_user_factors else None
        self.item_factors = (
            nn.Embedding(self.n_warm_items + 1, self.n_user_factors) if self.n_user_factors else None
        )
        if self.item_factors is not None:
            nn.init.normal_(self.item_factors.weight, std=0.1)
        self.user_factor_prior = config.user_factor_prior
        width = self.content_width()
        content = config.item_content and width > 0
        # Zero until model_init fits them (a ridge of the warm items' id rows on their features).
        self.item_bias_content = nn.Linear(width, 1, bias=False) if content and self.item_bias else None
        self.item_factors_content = (
            nn.Linear(width, self.n_user_factors, bias=False) if content and self.n_user_factors else None
        )
        for layer in (self.item_bias_content, self.item_factors_content):
            if layer is not None:
                nn.init.zeros_(layer.weight)
        self.inner_lr_log = None
        if config.learn_inner_lr:
            lr_names = [name for name, _ in self.decoder.named_parameters(prefix="decoder")]
            lr_names += [name for name in USER_PARAMETERS if getattr(self, name) is not None]
            self.inner_lr_log = nn.ParameterDict(
                {_lr_key(name): nn.Parameter(torch.zeros(())) for name in lr_names}
            )
        # Start predictions at the middle of the scale with small embeddings.
        for module in self.encoder.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.1)

    def to_rating(self, logits: torch.Tensor) -> torch.Tensor:
        """Maps decoder outputs into [rating_min, rating_max] with a scaled sigmoid.

        Args:
            logits: Float[...] raw decoder outputs.

        Returns:
            Float[...] ratings strictly inside the rating range.
        """
        return self.rating_min + (self.rating_max - self.rating_min) * torch.sigmoid(logits)

    def forward(
        self, user_cat: torch.Tensor, user_num: torch.Tensor, user_multi: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        """Predicts the ratings of one user (or of B users: the layers broadcast over leading dims).

        Args:
            user_cat: Long[..., C] categorical user features.
            user_num: Float[..., D] numeric user features.
            user_multi: Float[..., M] multi-hot user features.
            items: Long[..., N] item indices.

        Returns:
            Float[..., N] predicted ratings.
        """
        logits = self.decoder(self.encoder(user_cat, user_num, user_multi, items)).squeeze(-1)
        logits = logits + self.item_offset(items)
        return self.to_rating(self.user_offset(logits, factor_rows=self.item_factor_rows(items)))

    def user_offset(
        self,
        logits: torch.Tensor,
        user_bias: torch.Tensor | None = None,
        factor_rows: torch.Tensor | None = None,
        user_factors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adds the (adapted) per-user terms to one user's logits: bias, and factors . item factors.

        Args:
            logits: Float[..., N] logits of one user's items (or of B users: [B, N] with a bias of [B]).
            user_bias: the bias to use instead of the model's own (functional calls).
            factor_rows: Float[..., N, F] item factors of the scored items (:meth:`item_factor_rows`);
                None adds no interaction term.
            user_factors: Float[..., F] the user factors to use instead of the model's own.

        Returns:
            Float[..., N] logits.
        """
        bias = self.user_bias if user_bias is None else user_bias
        if bias is not None:
            logits = logits + bias.unsqueeze(-1) if bias.dim() > 0 else logits + bias
        factors = self.user_factors if user_factors is None else user_factors
        if factor_rows is not None and factors is not None:
            logits = logits + (factor_rows * factors.unsqueeze(-2)).sum(-1)
        return logits

    def content_width(self) -> int:
        """Width of :meth:`content_design`: one-hot categorical slots, then multi-hot, then numeric."""
        return (
            sum(int(size) for size in self.item_dims.cat_sizes)
            + self.item_dims.n_multi
            + self.item_dims.n_num
        )

    def content_design(self, items: torch.Tensor) -> torch.Tensor:
        """The catalogue items' encoded features as one flat row each (what the content terms read).

        Args:
            items: Long[...] item indices.

        Returns:
            Float[..., content_width], see :meth:`content_rows`.
        """
        encoder = self.encoder
        return self.content_rows(encoder.item_cat[items], encoder.item_num[items], encoder.item_multi[items])

    def content_rows(self, cat: torch.Tensor, num: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
        """Encoded item features as flat rows: what the content terms are linear in.

        Args:
            cat: Long[..., C] categorical slots.
            num: Float[..., D] numeric features.
            multi: Float[..., M] multi-hot features.

        Returns:
            Float[..., content_width] one-hot categorical slots, the multi-hot block (averaged over the
            active labels, as the embedder does) and the numeric block, in the embedder's block order.
        """
        parts = [
            torch.nn.functional.one_hot(cat[..., slot], int(size)).to(num.dtype)
            for slot, size in enumerate(self.item_dims.cat_sizes)
        ]
        parts.append(multi.to(num.dtype) / multi.sum(-1, keepdim=True).clamp(min=1.0))
        parts.append(num)
        return torch.cat(parts, dim=-1)

    def content_blocks(self) -> list[slice]:
        """The column ranges of :meth:`content_rows` per embedder block (cat slots, multi-hot, numeric)."""
        sizes = [int(size) for size in self.item_dims.cat_sizes]
        sizes += [self.item_dims.n_multi] * (self.item_dims.n_multi > 0)
        sizes += [self.item_dims.n_num] * (self.item_dims.n_num > 0)
        bounds = [0, *itertools.accumulate(sizes)]
        return [slice(start, end) for start, end in zip(bounds, bounds[1:], strict=False)]

    def item_factor_rows(
        self,
        items: torch.Tensor,
        weight: torch.Tensor | None = None,
        warm_idx: torch.Tensor | None = None,
        content: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The latent factors of items (None when the model has no user factors).

        Args:
            items: Long[...] item indices.
            weight: the item-factor table to use instead of the model's own (functional calls).
            warm_idx: the items' warm indices to use instead of the catalogue's (id dropout).
            content: Float[..., content_width] the items' feature rows to use instead of theirs
                (:meth:`content_design`; explanations switch features off).

        Returns:
            Float[..., F] factors (the id row, row 0 for cold items, plus the content map when the model
            has one) or None.
        """
        if self.item_factors is None:
            return None
        table = self.item_factors.weight if weight is None else weight
        rows = torch.nn.functional.embedding(
            self.encoder.item_warm_idx[items] if warm_idx is None else warm_idx, table
        )
        if self.item_factors_content is not None:
            rows = rows + self.item_factors_content(
                self.content_design(items) if content is None else content
            )
        return rows

    def item_offset(
        self,
        items: torch.Tensor,
        weight: torch.Tensor | None = None,
        warm_idx: torch.Tensor | None = None,
        content: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The per-item logit offset (zeros when the model has no item bias).

        Args:
            items: Long[...] item indices.
            weight: the item-bias table to use instead of the model's own (functional calls).
            warm_idx: the items' warm indices to use instead of the catalogue's (id dropout).
            content: the items' feature rows to use instead of theirs (see :meth:`item_factor_rows`).

        Returns:
            Float[...] offsets added to the decoder output.
        """
        if self.item_bias is None:
            return torch.zeros(items.shape, dtype=self.encoder.item_num.dtype, device=items.device)
        table = self.item_bias.weight if weight is None else weight
        offset = torch.nn.functional.embedding(
            self.encoder.item_warm_idx[items] if warm_idx is None else warm_idx, table
        ).squeeze(-1)
        if self.item_bias_content is not None:
            content = self.content_design(items) if content is None else content
            offset = offset + self.item_bias_content(content).squeeze(-1)
        return offset

    def init_output(self, rating: float) -> None:
        """Sets the last layer's bias so that an untrained model predicts about ``rating``.

        Args:
            rating: starting prediction, e.g. the training set's global mean rating.
        """
        fraction = (float(rating) - self.rating_min) / (self.rating_max - self.rating_min)
        last = self.decoder[self.decoder_linear_indices()[-1]]
        with torch.no_grad():
            last.bias.fill_(logit(fraction))

    def tail_start(self, mode: str) -> int | None:
        """Where the adapted part of the decoder starts: the model's split for the inner loop.

        Everything before this decoder layer (the encoder, the item bias and item factors too) is
        fixed while a user adapts in ``mode``, so it runs once per task; the inner loop runs only the
        tail from here on, plus the per-user terms.

        Args:
            mode: the adapt mode.

        Returns:
            The index in ``self.decoder`` of the first adapted layer, or None in mode "all" (the whole
            model adapts).
        """
        if mode == "all":
            return None
        names = adapted_parameter_names(self, mode)
        return min(int(name.split(".")[1]) for name in names if name.startswith("decoder."))

    def split_first_layer(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Splits the first decoder layer's weight into its user part and its item part.

        The layer sees ``[user part, item part]`` rows (:class:`PreferenceEncoder`); the user part is the
        same for all of a user's rows, so it is applied once per user and the item part per row.

        Args:
            weight: Float[..., out, in] the first layer's weight (batched per user or not).

        Returns:
            ``(user_weight, item_weight)``: Float[..., out, user_width], Float[..., out, in - user_width].
        """
        width = self.encoder.user.out_dim
        return weight[..., :width], weight[..., width:]

    def decoder_linear_indices(self) -> list[int]:
        """Returns the positions of the decoder's linear layers in ``self.decoder``."""
        return [i for i, layer in enumerate(self.decoder) if isinstance(layer, nn.Linear)]

    def config(self) -> dict[str, Any]:
        """Returns the JSON form of the model: the data's sizes and the :class:`ModelConfig` fields."""
        return {
            "user_dims": self.user_dims._asdict(),
            "item_dims": self.item_dims._asdict(),
            "n_warm_items": self.n_warm_items,
            "n_items": self.n_items,
            **self.settings.to_dict(),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PreferenceModel:
        """Builds a model from ``config()`` output with an all-zero item catalogue of the right shape.

        Args:
            config: the dict ``config()`` returned.

        Returns:
            A model whose weights and catalogue buffers are to be filled by ``load_state_dict``.
        """
        user_dims = FeatureDims(**config["user_dims"])
        item_dims = FeatureDims(**config["item_dims"])
        n_items = int(config["n_items"])
        catalogue = EncodedFeatures(
            cat=torch.zeros(n_items, len(item_dims.cat_sizes), dtype=torch.long),
            num=torch.zeros(n_items, item_dims.n_num),
            multi=torch.zeros(n_items, item_dims.n_multi),
        )
        warm = torch.zeros(n_items, dtype=torch.long)
        return cls(user_dims, item_dims, int(config["n_warm_items"]), catalogue, warm, model_config(config))

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Writes ``model.pt`` (state_dict, catalogue included) and ``model.json``.

        Args:
            directory: local directory (created if missing).
            extra: more JSON-serialisable keys for model.json, e.g. ``{"method": "maml", "adapt":
                {"mode": "decision", "inner_steps": 5, "inner_lr": 0.1}}``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu() for name, tensor in self.state_dict().items()}
        torch.save(state, directory / MODEL_FILE)
        document = {"format_version": 1, "class": "PreferenceModel", "config": self.config(), **(extra or {})}
        (directory / MODEL_JSON).write_text(json.dumps(document, indent=2, sort_keys=True))

    @classmethod
    def from_dir(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> PreferenceModel:
        """Loads a model written by ``save``.

        Args:
            directory: directory holding model.pt and model.json.
            map_location: device to load the tensors to.

        Returns:
            The model in eval mode.
        """
        directory = Path(directory)
        document = json.loads((directory / MODEL_JSON).read_text())
        model = cls.from_config(document["config"])
        state = torch.load(directory / MODEL_FILE, map_location=map_location, weights_only=True)
        model.load_state_dict(state)
        return model.to(map_location).eval()


def model_config(values: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` fields of a dict that holds more (``model.json``'s config, a train section).

    Args:
        values: a dict with some :class:`ModelConfig` keys among others.

    Returns:
        Those fields over the defaults.
    """
    names = {field.name for field in dataclasses.fields(ModelConfig)}
    return ModelConfig.from_dict({key: value for key, value in values.items() if key in names})


def weights_fingerprint(model: nn.Module) -> str:
    """A short digest of every parameter and buffer (names, dtypes, shapes, values).

    Two models with the same fingerprint score identically; a retrained model gets a new one even when
    it is packaged under the same version string (cached per-user states are keyed by it).

    Args:
        model: the model.

    Returns:
        16 hex digits of a SHA-256.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def read_model_json(directory: str | Path) -> dict[str, Any]:
    """Returns the parsed ``model.json`` of a model directory (config, method, adapt settings).

    Args:
        directory: a model directory.

    Returns:
        The document; ``document["adapt"]`` holds ``mode``, ``inner_steps`` and ``inner_lr`` when the
        model was meta-trained.
    """
    return json.loads((Path(directory) / MODEL_JSON).read_text())


def adapted_parameter_names(model: PreferenceModel, mode: str) -> list[str]:
    """Names of the parameters a per-user inner loop adapts.

    Args:
        model: the model.
        mode: ``"all"`` (every parameter), ``"decision"`` (the decoder MLP, as in MeLU) or ``"head"``
            (the last linear layer only, as in ANIL). The per-user bias and factors, when the model
            has them, are adapted in every mode.

    Returns:
        Parameter names in ``model.named_parameters()`` order.

    Raises:
        ValueError: unknown mode.
    """
    # The learned inner learning rates are meta-parameters of the inner loop, never adapted by it.
    names = [name for name, _ in model.named_parameters() if not name.startswith("inner_lr_log.")]
    if mode == "all":
        return names
    user = [name for name in USER_PARAMETERS if name in names]
    if mode == "decision":
        return [name for name in names if name.startswith("decoder.")] + user
    if mode == "head":
        last = model.decoder_linear_indices()[-1]
        return [name for name in names if name.startswith(f"decoder.{last}.")] + user
    raise ValueError(f"unknown adapt mode {mode!r}; expected one of {ADAPT_MODES}")


# Parameter groups by role (what meta-training may keep at its starting weights, ``TrainSettings.freeze``).
PARAMETER_GROUPS = ("encoder", "hidden", "head", "items", "content", "user", "inner_lr")


def parameter_group(model: PreferenceModel, name: str) -> str:
    """The role of a parameter: one of :data:`PARAMETER_GROUPS`.

    ``encoder``: the feature embeddings and the item-id embedding; ``hidden``: the decoder layers
    before the last; ``head``: the last decoder layer; ``items``: the item bias and item factor tables
    (id rows); ``content``: the maps from item features to item bias and factors; ``user``: the
    per-user bias and factors (their meta-learned prior); ``inner_lr``: learned inner learning rates.

    Args:
        model: the model.
        name: a name from ``model.named_parameters()``.

    Returns:
        The group's name.

    Raises:
        KeyError: a name the model does not have.
    """
    if name.startswith("encoder."):
        return "encoder"
    if name.startswith("decoder."):
        last = model.decoder_linear_indices()[-1]
        return "head" if name.startswith(f"decoder.{last}.") else "hidden"
    if name.startswith(("item_bias_content", "item_factors_content")):
        return "content"
    if name.startswith(("item_bias", "item_factors")):
        return "items"
    if name in USER_PARAMETERS:
        return "user"
    if name.startswith("inner_lr_log."):
        return "inner_lr"
    raise KeyError(f"parameter {name!r} belongs to no group of {PARAMETER_GROUPS}")


def _lr_key(name: str) -> str:
    return name.replace(".", "_")


def inner_learning_rates(
    model: PreferenceModel, names: list[str], lr: float, params: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor | float]:
    """The inner learning rate of each adapted parameter: ``lr``, times ``exp(scale)`` when learned.

    Args:
        model: the model.
        names: adapted parameter names.
        lr: the base inner learning rate.
        params: parameters to read the learned scales from (default: the model's own).

    Returns:
        name -> learning rate (a float, or a scalar tensor that carries the meta-gradient).
    """
    base = {name: lr * model.user_bias_lr if name in USER_PARAMETERS else lr for name in names}
    if model.inner_lr_log is None:
        return base
    params = dict(model.named_parameters()) if params is None else params
    rates: dict[str, torch.Tensor | float] = {}
    for name in names:
        key = f"inner_lr_log.{_lr_key(name)}"
        rates[name] = base[name] * torch.exp(params[key]) if key in params else base[name]
    return rates


def logit(probability: float) -> float:
    """Inverse sigmoid, used to start the output at a chosen rating."""
    probability = min(max(probability, 1e-4), 1 - 1e-4)
    return math.log(probability / (1 - probability))
