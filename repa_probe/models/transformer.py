"""DiT's adaLN-Zero diffusion transformer: the one network behind DiT, SiT and REPA.

The architecture is the same for all three code bases; what differs is how the network reads time
(``time_convention``, see :mod:`repa_probe.timesteps`) and which output channels it returns:

* ``"ddpm"`` (DiT) — integer DDPM steps 0..999, t=999 noisiest; returns all ``out_channels`` channels
  (2C when ``learn_sigma``: epsilon then the variance interpolation).
* ``"sit"`` (official willisma/SiT) — float t in [0, 1], t=0 noise and t=1 data; when ``learn_sigma``
  the unused second half of the output is cut, so C channels are returned.
* ``"repa"`` (sihyun-yu/REPA and this project's default) — float t in [0, 1], t=0 data and t=1 noise;
  ``learn_sigma`` must be False and C channels are returned.

``family`` is the architecture name of the registry (``"DiT"`` for ``ddpm``, else ``"SiT"``).
Parameter names and shapes match the official DiT ``models.py``, SiT ``models.py`` and REPA
``models/sit.py`` state dicts, so their checkpoints load strictly. The model never drops labels
(label dropout is the objective's job).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Sequence

import torch
import torch.nn as nn

from repa_probe.errors import debug_enabled
from repa_probe.models.layers import (  # noqa: F401 (the building blocks are re-exported here)
    FREQUENCY_DIM, Attention, Block, FinalLayer, LabelEmbedder, Mlp, ModelInputError, PatchEmbed, TimestepEmbedder,
    build_projector, modulate, sincos_pos_embed_2d, timestep_embedding)

from repa_probe.models.latent_norm import LatentBatchNorm
from repa_probe.timesteps import CONVENTIONS as TIME_CONVENTIONS
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The constructor keywords of :class:`DiffusionTransformer` (the official DiT / SiT / REPA constructors'
    names, so their ``args`` map one to one); ``model.config`` gives them back as a dict.

    ``input_size`` (latent side), ``patch_size``, ``in_channels``, ``hidden_size``, ``depth``, ``num_heads``,
    ``mlp_ratio``, ``num_classes``, ``class_dropout_prob`` (> 0 adds the null class), ``learn_sigma``, ``qk_norm``;
    REPA: ``encoder_depth`` (1-based block the projectors read), ``z_dims`` (one projector per target width,
    empty = none), ``projector_dim``, ``projector_type`` (``mlp`` | ``conv``), ``projector_kernel``;
    ``time_convention`` (``repa`` | ``sit`` | ``ddpm``); REG: ``cls_token_dim``; REPA-E: ``bn_momentum``.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    qk_norm: bool = False
    encoder_depth: int = 8
    z_dims: Sequence[int] = ()
    projector_dim: int = 2048
    time_convention: str = "repa"
    projector_type: str = "mlp"
    projector_kernel: int = 3
    cls_token_dim: int = 0
    bn_momentum: float | None = None


class DiffusionTransformer(nn.Module):
    """Class-conditional adaLN-Zero transformer on ``(B, C, H, W)`` latents (or pixels).

    See the module docstring for ``time_convention``. ``encoder_depth`` is 1-based: the REPA projectors read
    the output of block ``encoder_depth`` (= ``hidden[encoder_depth - 1]``). ``z_dims`` empty means
    no projectors. ``projector_type``: ``"mlp"`` (REPA) or ``"conv"`` (iREPA: a ``projector_kernel``-sized
    convolution on the token grid). ``bn_momentum`` (REPA-E) adds ``bn``, the BatchNorm of the clean latents
    (:mod:`repa_probe.models.latent_norm`; applied by the caller before noising, never in ``forward``;
    ``None`` = no ``bn``). ``config`` returns the constructor keywords (enough to rebuild the model).

    ``cls_token_dim > 0`` makes it REG's SiT (Martinser/REG): the target encoder's class token ``(B, cls_token_dim)``
    enters as one extra token in front of the patch tokens (``wg_norm(cls_projectors2(c))``, position row 0 of a
    ``(1, T + 1, D)`` ``pos_embed`` that is zero), every block sees ``T + 1`` tokens, the projectors read all of
    them, and ``final_layer.linear_cls`` maps the class token back to ``cls_token_dim``. Such a model is called
    ``model(x, t, y, cls_token=c)`` and returns ``(out, zs, cls_out)``; ``num_prefix_tokens`` is 1 (else 0).
    """

    def __init__(self, config: TransformerConfig | None = None, **fields):
        super().__init__()
        if config is None:
            config = TransformerConfig(**fields)
        elif fields:
            raise TypeError(f"DiffusionTransformer takes a TransformerConfig or its fields, not both ({sorted(fields)})")
        (input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, num_classes,
         class_dropout_prob, learn_sigma, qk_norm, encoder_depth, z_dims, projector_dim, time_convention,
         projector_type, projector_kernel, cls_token_dim, bn_momentum) = dataclasses.astuple(config)
        z_dims = tuple(int(z) for z in z_dims)
        _check_config(dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, class_dropout_prob=class_dropout_prob, learn_sigma=learn_sigma,
                           encoder_depth=encoder_depth, z_dims=z_dims, projector_dim=projector_dim,
                           time_convention=time_convention))
        self._config = dict(
            input_size=int(input_size), patch_size=int(patch_size), in_channels=int(in_channels),
            hidden_size=int(hidden_size), depth=int(depth), num_heads=int(num_heads),
            mlp_ratio=float(mlp_ratio), num_classes=int(num_classes),
            class_dropout_prob=float(class_dropout_prob), learn_sigma=bool(learn_sigma),
            qk_norm=bool(qk_norm), encoder_depth=int(encoder_depth), z_dims=list(z_dims),
            projector_dim=int(projector_dim), time_convention=time_convention, projector_type=projector_type,
            projector_kernel=int(projector_kernel), cls_token_dim=_check_class_token(cls_token_dim, projector_type),
        )
        if bn_momentum is not None:  # REPA-E's latent BatchNorm (keys bn.*): see models/latent_norm.py
            if not 0.0 < float(bn_momentum) <= 1.0:
                raise ModelInputError(f"invalid DiffusionTransformer config: bn_momentum must be in (0, 1], "
                                      f"got {bn_momentum}")
            self._config["bn_momentum"] = float(bn_momentum)
        self.time_convention = time_convention
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes, self.learn_sigma = num_classes, learn_sigma
        self.encoder_depth, self.z_dims = encoder_depth, z_dims
        self.out_channels = in_channels * 2 if learn_sigma else in_channels  # final layer's channels
        self.returned_channels = self.out_channels if time_convention == "ddpm" else in_channels
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size ** 2
        self.cls_token_dim = int(cls_token_dim)
        self.num_prefix_tokens = int(self.cls_token_dim > 0)  # REG's class token, in front of the patch tokens

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.num_tokens, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(self._make_block() for _ in range(depth))
        self.projectors = nn.ModuleList(build_projector(hidden_size, projector_dim, z, projector_type, projector_kernel)
                                        for z in z_dims)
        self.final_layer = self._make_final_layer()
        if self.cls_token_dim:  # REG: the class token's input map (official names)
            self.cls_projectors2 = nn.Linear(self.cls_token_dim, hidden_size)
            self.wg_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.bn = LatentBatchNorm(in_channels, float(bn_momentum)) if bn_momentum is not None else None
        if self.pos_embed.device.type != "meta":  # a meta model (shapes only, e.g. load_model) has nothing to fill
            self.initialize_weights()

    def _make_block(self) -> nn.Module:
        """One transformer block ``(x: (B, T, D), c: (B, D)) -> (B, T, D)``; a subclass may build its own kind
        (:mod:`repa_probe.models.lightningdit`)."""
        c = self._config
        return Block(c["hidden_size"], c["num_heads"], c["mlp_ratio"], c["qk_norm"])

    def _make_final_layer(self) -> nn.Module:
        """The output layer ``(B, T, D), (B, D) -> (B, T, p*p*out_channels)`` (overridable like ``_make_block``)."""
        return FinalLayer(self.hidden_size, self.patch_size, self.out_channels, self.cls_token_dim)

    @property
    def family(self) -> str:
        """Architecture name of the registry: ``"DiT"`` (DDPM time) or ``"SiT"`` (float time)."""
        return "DiT" if self.time_convention == "ddpm" else "SiT"

    @property
    def config(self) -> dict:
        """Constructor keywords as a fresh plain dict (``z_dims`` as a list)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT init: xavier-uniform linears (zero bias), patch-embed xavier on the flattened kernel,
        N(0, 0.02) label table and timestep MLP weights, zero adaLN and final output layers,
        fixed sin-cos ``pos_embed`` (a zero row in front for REG's class token, whose output map is zeroed too)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        table = sincos_pos_embed_2d(self.hidden_size, self.grid_size, self.pos_embed.device)
        self.pos_embed.copy_(nn.functional.pad(table, (0, 0, self.num_prefix_tokens, 0))[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1], self.final_layer.linear,
            *([self.final_layer.linear_cls] if self.cls_token_dim else []),
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, T, p*p*c)`` -> ``(B, c, H, W)`` with c = last dim / p², square grid."""
        b, t, f = x.shape
        p, g = self.patch_size, self.grid_size
        if t != g * g or f % (p * p):
            raise ModelInputError(f"unpatchify expects (B, {g * g}, p*p*c) with p={p}, got {tuple(x.shape)}")
        c = f // (p * p)
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def _check_inputs(self, x: torch.Tensor, t, y: torch.Tensor, cls_token=None) -> torch.Tensor:
        """Validate shapes/dtypes (and the label range on the CPU or in debug mode, see below); returns ``t``
        as a ``(B,)`` tensor (a 0-d t is broadcast). Never reads a device tensor back to the host by default."""
        _check_cls_input(self.cls_token_dim, x.shape[0], cls_token)
        s = self.input_size
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] != s or x.shape[3] != s:
            raise ModelInputError(f"x must have shape (B, {self.in_channels}, {s}, {s}), got {tuple(x.shape)}")
        b = x.shape[0]
        if not torch.is_tensor(t):
            raise ModelInputError(f"t must be a tensor of shape ({b},), got {type(t).__name__}")
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ModelInputError(f"t must have shape ({b},), got {tuple(t.shape)}")
        if not torch.is_tensor(y) or y.shape != (b,) or y.dtype not in _INT_DTYPES:
            got = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise ModelInputError(f"y must be an integer tensor of shape ({b},), got {got}")
        # label range: free on the CPU; on an accelerator reading it back would stall the host every call,
        # so it runs there only with REPA_PROBE_DEBUG=1 (shapes and dtypes above are checked always)
        if b and not torch.compiler.is_compiling() and (y.device.type == "cpu" or debug_enabled()):
            lo, hi = torch.stack([y.min(), y.max()]).tolist()
            rows = self.y_embedder.num_rows
            if lo < 0 or hi >= rows:
                raise ModelInputError(f"labels must be in [0, {rows - 1}], got range [{lo}, {hi}]")
        return t

    def _embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               cls_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, P + T, D)`` (P = ``num_prefix_tokens``: REG's class token first) and ``c: (B, D)``."""
        tokens = self.x_embedder(x)
        if self.cls_token_dim:
            tokens = torch.cat([self.wg_norm(self.cls_projectors2(cls_token)).unsqueeze(1), tokens], dim=1)
        tokens = tokens + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        return tokens, c

    def project(self, h: torch.Tensor) -> list[torch.Tensor]:
        """REPA projector outputs for block tokens ``h: (B, T, D)`` -> ``list[(B, T, z_dim)]``."""
        return [proj(h) for proj in self.projectors]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_hidden: bool = False,
                cls_token: torch.Tensor | None = None):
        """Denoiser forward pass.

        Args:
            x: ``(B, C, H, W)`` noisy input, ``H = W = input_size``.
            t: ``(B,)`` time in this model's ``time_convention`` (float, or int DDPM steps; see
                :func:`repa_probe.timesteps.model_times`); used as given.
            y: ``(B,)`` int64 labels; ``num_classes`` is the null (unconditional) class.
            return_hidden: also return the output of every block.
            cls_token: REG models only (required there): ``(B, cls_token_dim)`` noisy class token.

        Returns:
            ``(out, zs)`` or ``(out, zs, hidden)``: ``out: (B, C or 2C, H, W)`` (2C only for
            ``time_convention="ddpm"`` with ``learn_sigma``), ``zs: list[(B, P + T, z_dim)]`` projector outputs
            on the block-``encoder_depth`` tokens (empty without projectors), ``hidden:
            list[(B, P + T, D)]`` of length ``depth`` (``hidden[i]`` is block i's output, 0-based); P =
            ``num_prefix_tokens``. REG models return ``(out, zs, cls_out)`` / ``(out, zs, cls_out, hidden)``
            with ``cls_out: (B, cls_token_dim)``, the class token's velocity.
        """
        t = self._check_inputs(x, t, y, cls_token)
        h, c = self._embed(x, t, y, cls_token)
        zs: list[torch.Tensor] = []
        hidden: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if return_hidden:
                hidden.append(h)
            if i + 1 == self.encoder_depth and len(self.projectors):
                zs = self.project(h)
        h = self.final_layer.modulated(h, c)
        out = self.unpatchify(self.final_layer.linear(h[:, self.num_prefix_tokens:]))
        if out.shape[1] != self.returned_channels:
            out = out[:, : self.returned_channels]
        outputs = (out, zs, self.final_layer.linear_cls(h[:, 0])) if self.cls_token_dim else (out, zs)
        return (*outputs, hidden) if return_hidden else outputs

    def forward_features(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         layers: Sequence[int] | None = None, cls_token: torch.Tensor | None = None,
                         prefix: bool = False) -> list[torch.Tensor]:
        """Hidden states of selected blocks, stopping after the deepest one requested.

        Cheaper than ``forward(..., return_hidden=True)`` for feature extraction: blocks deeper
        than ``max(layers)``, the final layer and the projectors are never run.

        Args:
            x, t, y: as in :meth:`forward`.
            layers: 0-based block indices (``hidden[i]`` convention; negative values count from
                the end as in Python); ``None`` means every block.
            cls_token: REG models only (required there), as in :meth:`forward`.
            prefix: keep REG's class token in front (``(B, 1 + T, D)``); by default only patch tokens return.

        Returns:
            list of ``(B, T, D)`` tensors (``(B, P + T, D)`` with ``prefix``), one per entry of ``layers``.
        """
        if layers is None:
            wanted = list(range(self.depth))
        else:
            wanted = []
            for layer in layers:
                try:
                    index = operator.index(layer)
                except TypeError:
                    index = None
                if index is None or isinstance(layer, bool) or not -self.depth <= index < self.depth:
                    raise ModelInputError(f"layers must be ints in [-{self.depth}, {self.depth - 1}], got {layer!r}")
                wanted.append(index % self.depth)
        if not wanted:
            return []
        t = self._check_inputs(x, t, y, cls_token)
        h, c = self._embed(x, t, y, cls_token)
        keep: dict[int, torch.Tensor] = {}
        skip = 0 if prefix else self.num_prefix_tokens
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            h = block(h, c)
            if i in wanted:
                keep[i] = h[:, skip:]
        return [keep[i] for i in wanted]


def _check_class_token(cls_token_dim, projector_type: str) -> int:
    """REG's class-token width (0 = none) as an int; the conv projector needs a square grid, so not with REG."""
    if isinstance(cls_token_dim, bool) or not isinstance(cls_token_dim, int) or cls_token_dim < 0:
        raise ModelInputError(f"invalid DiffusionTransformer config: cls_token_dim must be an int >= 0, "
                              f"got {cls_token_dim!r}")
    if cls_token_dim and projector_type != "mlp":
        raise ModelInputError("invalid DiffusionTransformer config: REG's class token (cls_token_dim > 0) needs the "
                              f"mlp projector (the conv projector reads a square token grid), got {projector_type!r}")
    return cls_token_dim


def _check_cls_input(cls_token_dim: int, batch: int, cls_token) -> None:
    """REG models need ``cls_token: (B, cls_token_dim)`` float; other models must not get one."""
    if not cls_token_dim:
        if cls_token is not None:
            raise ModelInputError("cls_token is only for REG models (cls_token_dim > 0); this model has none")
        return
    if not torch.is_tensor(cls_token) or cls_token.shape != (batch, cls_token_dim) or not cls_token.is_floating_point():
        got = tuple(cls_token.shape) if torch.is_tensor(cls_token) else type(cls_token).__name__
        raise ModelInputError(f"this REG model needs cls_token=: a float tensor ({batch}, {cls_token_dim}) (the noisy "
                              f"class token), got {got}")


def encoder_depth_problem(encoder_depth: int, depth: int | None) -> str | None:
    """The one rule for ``encoder_depth`` (1-based block the projectors read): in ``1..depth`` (``depth`` None:
    unknown, positivity only). The problem in words, or None. The training config applies it when read, naming
    its key; the constructor applies it to every other caller."""
    if encoder_depth < 1:
        return f"encoder_depth must be positive, got {encoder_depth}"
    if depth is not None and encoder_depth > depth:
        return f"encoder_depth={encoder_depth} is larger than the model depth {depth}"
    return None


def _check_config(c: dict) -> None:
    """Raise ModelInputError on an inconsistent constructor configuration ``c`` (the constructor's keywords as
    given, before any conversion)."""
    ints = {k: c[k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads")}
    input_size, patch_size, hidden_size, depth, num_heads = (ints[k] for k in ("input_size", "patch_size",
                                                                               "hidden_size", "depth", "num_heads"))
    mlp_ratio, num_classes, class_dropout_prob, learn_sigma = (c[k] for k in ("mlp_ratio", "num_classes",
                                                                              "class_dropout_prob", "learn_sigma"))
    encoder_depth, z_dims, projector_dim, time_convention = (c[k] for k in ("encoder_depth", "z_dims",
                                                                            "projector_dim", "time_convention"))
    bad_int = [f"{k}={v!r}" for k, v in ints.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    checks = [
        (time_convention not in TIME_CONVENTIONS,
         f"time_convention must be one of {TIME_CONVENTIONS}, got {time_convention!r}"),
        (bool(bad_int), f"these must be positive ints: {', '.join(bad_int)}"),
    ]
    if not bad_int:
        checks += [
            (input_size % patch_size != 0, f"input_size {input_size} is not divisible by patch_size {patch_size}"),
            (hidden_size % num_heads != 0, f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}"),
            (hidden_size % 4 != 0, f"hidden_size must be divisible by 4 (2-D sin-cos table), got {hidden_size}"),
            (mlp_ratio <= 0 or int(hidden_size * mlp_ratio) < 1, f"mlp_ratio must be positive, got {mlp_ratio}"),
            (bool(z_dims) and encoder_depth_problem(encoder_depth, depth) is not None,
             f"{encoder_depth_problem(encoder_depth, depth)} (1-based block the projectors read)"),
        ]
    checks += [
        (num_classes < 0 or not 0.0 <= class_dropout_prob < 1.0,
         f"need num_classes >= 0 and 0 <= class_dropout_prob < 1, got {num_classes}, {class_dropout_prob}"),
        (num_classes + int(class_dropout_prob > 0) < 1, "the label table would be empty"),
        (time_convention == "repa" and learn_sigma,
         "time_convention 'repa' predicts velocity only: learn_sigma must be False"),
        (any(z < 1 for z in z_dims) or (bool(z_dims) and projector_dim < 1),
         f"z_dims and projector_dim must be positive, got {z_dims}, {projector_dim}"),
    ]
    for failed, msg in checks:
        if failed:
            raise ModelInputError(f"invalid DiffusionTransformer config: {msg}")
