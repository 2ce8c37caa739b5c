"""Probe runs: checkpoints → hidden states → linear / segmentation probes → CSV, JSON and figures.

For every checkpoint × block × timestep, the block output of the noisy input (user time, see
:mod:`repa_probe.timesteps`) is probed:

- ``task="linear"``: mean-pooled tokens ``(N, D)`` → :func:`~repa_probe.analysis.probes.fit_linear_probe` (top-1,
  top-5) on the dataset's class labels;
- ``task="segmentation"``: patch tokens ``(N, T, D)`` → :func:`~repa_probe.analysis.probes.fit_segmentation_probe`
  (mIoU, pixel accuracy) on the per-pixel masks.

The model always receives its null class (unconditional features): feeding the true class would hand
the probe its answer. Optional reference rows probe the target encoder itself (CLS and mean-patch
features for the linear probe, patch tokens for segmentation) on the same images.

Runs on the shared skeleton (:mod:`repa_probe.analysis.core.runner`). Outputs in ``out_dir``: ``{prefix}.csv``
(one row per checkpoint, source, layer, timestep, metric; rewritten after every checkpoint), ``summary.json``
(settings, rows and every probe's details: chosen hyper-parameters, held-out sweep, per-class IoU),
``options.json`` and ``figures/{prefix}_{metric}.{pdf,png}``; prefix = "probe" or "segment".
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from repa_probe.analysis.core.class_token import attach_class_tokens, class_token_encoder
from repa_probe.analysis.core.features import InputsByVAE, extract_features, prepare_inputs
from repa_probe.analysis.core.inputs import check_times_and_layers, resolve_encoder
from repa_probe.analysis.core.options import ProbeOptions
from repa_probe.analysis.probes import fit_linear_probe, fit_segmentation_probe
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.analysis.probes.inputs import collect_masks, resolve_probe_data
from repa_probe.analysis.probes.plots import chance_levels, make_probe_figures
from repa_probe.analysis.core.runner import Analysis, Run, run_analysis
from repa_probe.analysis.core.targets import encoder_features
from repa_probe.reports.bootstrap import resample_means
from repa_probe.reports.numbers import fmt
from repa_probe.timesteps import TIME_HELP, label

log = logging.getLogger("repa_probe")

CSV_COLUMNS = ("checkpoint", "step", "source", "layer", "timestep", "metric", "value", "num_train", "num_test")
TASK_SPECS = {  # task -> (output prefix, pooling, metrics, encoder reference kinds)
    "linear": ("probe", "mean", ("top1", "top5"), ("cls", "mean_patch")),
    "segmentation": ("segment", "tokens", ("miou", "pixel_acc"), ("patch",)),
}
PROBE_SPLITS = ("train", "test")


def layer_groups(layers: Sequence[int], num_samples: int, values_per_sample: int, budget_bytes: float) -> list:
    """Split ``layers`` into consecutive groups whose float32 features (``num_samples`` x
    ``values_per_sample`` per layer) fit in ``budget_bytes``; at least one layer per group."""
    per_layer = 4.0 * num_samples * values_per_sample
    size = max(1, int(budget_bytes // max(per_layer, 1.0)))
    return [list(layers[i:i + size]) for i in range(0, len(layers), size)]


def _metric_rows(result, base: dict, bootstrap: int = 0, seed: int = 0) -> list[dict]:
    """One row per metric (top5 only with more than 5 classes); with ``bootstrap`` and per-image hits (linear
    probes), the accuracy's replicates over test images (popped into ``replicates.npz`` by the run skeleton)."""
    rows = []
    for k, v in result.metrics().items():
        row = dict(base, metric=k, value=v, num_train=result.num_train, num_test=result.num_test)
        hits = getattr(result, "hits", {}).get(k)
        if bootstrap and hits is not None:
            row.update(replicates=resample_means(hits.double().numpy(), bootstrap, seed), replicate_scale=1.0)
        rows.append(row)
    return rows


class ProbeAnalysis(Analysis):
    """Linear or segmentation probes as a :class:`~repa_probe.analysis.core.runner.Analysis`."""

    columns = CSV_COLUMNS

    def __init__(self, task: str):
        if task not in TASK_SPECS:
            raise AnalysisInputError(f"task must be one of {', '.join(TASK_SPECS)}, got {task!r}")
        self.task = task
        self.name, self.pool, self.metrics, self.ref_kinds = TASK_SPECS[task]
        self.details: list[dict] = []
        self.warnings: list[str] = []

    # ---- hooks
    def setup(self, run: Run) -> None:
        opts = run.options
        self.layers = check_times_and_layers(run.entries, opts)
        self.data = resolve_probe_data(run.entries, opts)
        self.encoder = resolve_encoder(run.entries, opts, self.data.source.resolution) \
            if opts.encoder_reference else None
        self.cls_encoder = class_token_encoder(run.entries, self.encoder)  # REG models take its class token

    def prepare(self, run: Run) -> list[dict]:
        """Model inputs and probe targets of both splits; the encoder reference rows."""
        opts, vae = run.options, self.data.source.vae
        vae = vae.to(run.device) if vae is not None else None
        self.inputs = {s: prepare_inputs(getattr(self.data, s), vae, opts.batch_size, progress=opts.progress)
                       for s in PROBE_SPLITS}
        for s in PROBE_SPLITS:
            attach_class_tokens(self.inputs[s], getattr(self.data, s), self.cls_encoder, opts, run.device)
        self.by_vae = {s: InputsByVAE(getattr(self.data, s), self.inputs[s], self.data.source.vae, run.device,
                                      opts.batch_size, opts.progress) for s in PROBE_SPLITS}
        # The noise of an image is keyed by (seed, index). Test indices continue after the training ones, so no
        # test image shares its noise with a training image: with shared noise, a probe could read the label
        # off the noise pattern whenever labels follow the index (shapes: label = index % classes).
        test = self.inputs["test"]
        self.inputs["test"] = dataclasses.replace(test, indices=test.indices + len(self.inputs["train"]))
        if self.task == "linear":
            self.targets = {s: self.inputs[s].labels for s in PROBE_SPLITS}
        else:
            self.targets = {s: collect_masks(getattr(self.data, s), opts.batch_size) for s in PROBE_SPLITS}
        return self._reference_rows(run) if self.encoder is not None else []

    def _entry_inputs(self, split: str, entry):
        """The split's model inputs as ``entry``'s VAE gives them (test indices after the training ones)."""
        inputs = self.by_vae[split].get(entry.vae)
        if split == "test" and inputs is not self.inputs["test"]:
            inputs = dataclasses.replace(inputs, indices=inputs.indices + len(self.inputs["train"]))
        return inputs

    def analyse(self, run: Run, entry, model) -> list[dict]:
        opts, rows = run.options, []
        layers = self.layers[entry.label]
        per_sample = model.hidden_size * (model.num_tokens if self.pool == "tokens" else 1) * len(opts.timesteps)
        n_total = sum(len(self.inputs[s]) for s in PROBE_SPLITS)
        inputs = {s: self._entry_inputs(s, entry) for s in PROBE_SPLITS}  # REPA-E: each checkpoint's own VAE
        for group in layer_groups(layers, n_total, per_sample, opts.max_feature_gb * 2 ** 30):
            feats = {s: extract_features(model, entry.objective, inputs[s], opts.timesteps, group, pool=self.pool,
                                         device=run.device, batch_size=opts.batch_size, seed=opts.seed,
                                         labels="null", progress=opts.progress) for s in PROBE_SPLITS}
            for t in opts.timesteps:
                for layer in group:
                    base = dict(checkpoint=entry.label, step=entry.info.step, source="model", layer=layer,
                                timestep=label(t))
                    rows += self._fit(run, feats["train"].get(layer, t), feats["test"].get(layer, t), base)
            del feats
        return rows

    def figures(self, run: Run, rows: list[dict]) -> list:
        return make_probe_figures(rows, run.out / "figures", self.name, self.metrics,  # metrics without rows skipped
                                  chance=chance_levels(self.task, self.data.num_classes))

    def summary(self, run: Run, rows: list[dict]) -> dict:
        opts = run.options
        settings = dict(self.data.info, pool=self.pool, labels="null", time_convention=TIME_HELP,
                        backend=opts.backend if self.task == "linear" else None, probe_options=self._probe_options(opts))
        enc = self.encoder
        return {"task": self.task, "settings": settings, "rows": rows, "details": self.details,
                "warnings": self.warnings,
                "encoder": None if enc is None else {"name": enc.name, "cache_key": enc.cache_key, "source": enc.source}}

    # ---- helpers
    @staticmethod
    def _probe_options(opts) -> dict:
        return {"epochs": opts.epochs} if opts.epochs is not None else {}

    def _fit(self, run: Run, train_x, test_x, base: dict) -> list[dict]:
        """Fit one probe; its metric rows (its details are kept for the summary)."""
        opts, y = run.options, self.targets
        if self.task == "linear":
            res = fit_linear_probe(train_x, y["train"], test_x, y["test"], backend=opts.backend,
                                   num_classes=self.data.num_classes, seed=opts.seed,
                                   device=run.device if opts.backend == "torch" else None, **self._probe_options(opts))
        else:
            res = fit_segmentation_probe(train_x, y["train"], test_x, y["test"], self.data.num_classes,
                                         ignore_index=self.data.ignore_index, device=run.device, seed=opts.seed,
                                         **self._probe_options(opts))
        rows = _metric_rows(res, base, opts.bootstrap, opts.seed)
        self._warn_unselected(res)
        self.details.append(dict(base, **res.to_dict()))
        where = base["source"] if base["layer"] is None else f"block {base['layer']} t={base['timestep']}"
        log.info("%s %s %s: %s", self.name, base["checkpoint"], where,
                 ", ".join(f"{r['metric']}={fmt(r['value'])}" for r in rows))
        return rows

    def _warn_unselected(self, res) -> None:
        """Say once (log and ``summary.json`` ``warnings``) when too few training images left no held-out part:
        the linear probe's C (or learning rate) is then not chosen on held-out data, the segmentation probe
        keeps its last epoch."""
        if self.task == "linear" and res.hparams.get("selection") == "default":
            what = (f"the linear probe's hyper-parameters were not chosen on a held-out part (--num-train "
                    f"{res.num_train} for {res.num_classes} classes leaves none): the grid's middle point "
                    f"{ {k: v for k, v in res.hparams.items() if k != 'selection'} } was used; give each class at "
                    "least 5 training images")
        elif self.task == "segmentation" and res.hparams.get("num_fit") == res.num_train:
            what = (f"the segmentation probe had no held-out images (--num-train {res.num_train}): every epoch was "
                    "run and the last one kept; use --num-train 10 or more for early stopping")
        else:
            return
        if what not in self.warnings:
            log.warning("WARNING: %s", what)
            self.warnings.append(what)

    def _reference_rows(self, run: Run) -> list[dict]:
        """Probe rows of the target encoder's own features (one per reference kind)."""
        opts, enc, rows = run.options, self.encoder.to(run.device), []
        for kind in self.ref_kinds:
            feats = {s: encoder_features(enc, getattr(self.data, s), kind, cache_dir=opts.cache_dir,
                                         batch_size=opts.batch_size, progress=opts.progress) for s in PROBE_SPLITS}
            base = dict(checkpoint=f"encoder:{enc.name}", step=None, source=f"encoder:{kind}", layer=None,
                        timestep=None)
            rows += self._fit(run, feats["train"], feats["test"], base)
        self.encoder = enc.to("cpu")
        return rows


def run_probes(ckpts: Sequence, out_dir, options: ProbeOptions | None = None) -> dict:
    """Probe every checkpoint (``options.task``: linear or segmentation) and write ``{prefix}.csv``,
    ``summary.json``, ``options.json`` and figures under ``out_dir``; returns the summary dict.

    ``options.cache_dir`` None caches encoder features under ``{out_dir}/cache``.
    """
    from pathlib import Path

    options = options or ProbeOptions()
    if options.cache_dir is None:
        options = options.replace(cache_dir=str(Path(out_dir) / "cache"))
    return run_analysis(ProbeAnalysis(options.task), ckpts, out_dir, options)


__all__ = ["run_probes", "layer_groups", "ProbeAnalysis",
           "ProbeOptions", "CSV_COLUMNS", "TASK_SPECS"]
