"""The benchmark's comparison: every results row found under a folder, as a table and as one
curve per run (Segmenter mIoU, and the frozen probe's mIoU and kNN top-1 when measured) against
pretraining epochs, the baselines drawn as reference lines; curves are labelled by what tells them
apart (the method, then its parameters and whatever other setting differs)."""
from __future__ import annotations

import json
import os

from evals.runs import read_result_rows, result_key
from mask_methods import REGISTRY, get_method


def read_results(output_dir: str) -> list[dict]:
    """Every results row under output_dir, once each (a line that is not a row is named in a
    warning and left out)."""
    rows = []
    for root, _, files in os.walk(output_dir):
        if "results.jsonl" in files:
            rows += read_result_rows(os.path.join(root, "results.jsonl"))
    seen, unique = set(), []
    for r in rows:
        if result_key(r) not in seen:
            seen.add(result_key(r))
            unique.append(r)
    labels = curve_labels(unique)
    return sorted(unique, key=lambda r: (labels[curve_key(r)], r["epochs"]))


def curve_key(row: dict) -> tuple:
    return (row.get("run_id") or f"{row['method']}|{row.get('coverage_ratio')}", row.get("eval_id"))


def curve_labels(rows: list[dict]) -> dict:
    """A legend label per curve: the method (and coverage), then whatever else tells apart curves
    that would otherwise share a label (model, stacking, seed, schedule, settings digests)."""
    def base(r):
        if r.get("baseline"):
            return f"{r['method']} (baseline)"
        cov = r.get("coverage_ratio")
        return r["method"] if cov is None else f"{r['method']} {cov:g}%"

    config = lambda r, k: (r.get("config") or {}).get(k)  # noqa: E731
    extras = [lambda r: (r.get("model") or "").replace("mae_", ""),
              lambda r: "stacked" if r.get("stack") else "",
              lambda r: f"seed {config(r, 'seed')}" if config(r, "seed") is not None else "",
              lambda r: f"{config(r, 'pretrain_epochs')} ep schedule" if config(r, "pretrain_epochs") else "",
              "settings",  # the flags that differ, by name and value
              lambda r: f"seg {r['eval_id']}" if r.get("eval_id") else "",
              lambda r: (r.get("run_id") or "").rsplit("-", 1)[-1]]
    first = {}
    for r in rows:
        first.setdefault(curve_key(r), r)
    labels = {key: base(r) for key, r in first.items()}
    for extra in extras:
        groups: dict = {}
        for key, label in labels.items():
            groups.setdefault(label, []).append(key)
        for label, keys in groups.items():
            if len(keys) < 2:
                continue
            texts = differing_settings([first[k] for k in keys]) if extra == "settings" else \
                [extra(first[k]) for k in keys]
            if len(set(texts)) > 1:
                for k, text in zip(keys, texts):
                    labels[k] = ", ".join(x for x in (label, text) if x)
    return labels


def row_settings(row: dict) -> dict:
    """A row's configuration as flat name -> value: the benchmark's own settings, the mask method's
    parameters (defaults included, so '--block_size 4' and no flag read the same) and every flag of
    its --pretrain-args / --seg-args (a bare flag: 'on')."""
    config = row.get("config") or {}
    flat = {k: v for k, v in config.items() if not isinstance(v, (list, dict)) and k != "stack_sha256"}
    params = row.get("method_params")
    if params is None and row.get("method") in REGISTRY:  # a row from before method parameters: the defaults
        params = get_method(row["method"]).params()
    flat.update({f"--{k}": str(v) for k, v in (params or {}).items() if k != "coverage_ratio"})
    for key in ("pretrain_args", "seg_args"):
        argv = config.get(key) or []
        i = 0
        while i < len(argv):
            if argv[i].startswith("--"):
                name, _, inline = argv[i].partition("=")
                if inline:
                    flat[name] = inline
                elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    flat[name] = argv[i + 1]
                    i += 1
                else:
                    flat[name] = "on"
            i += 1
    return flat


def differing_settings(rows: list[dict]) -> list[str]:
    """For each row, the settings in which the rows differ ('--blr 1e-3'), '' where none do."""
    settings = [row_settings(r) for r in rows]
    names = sorted({n for s in settings for n in s if len({str(t.get(n, "-")) for t in settings}) > 1})
    return [" ".join(f"{n} {s.get(n, '-')}" if n.startswith("--") else f"{n}={s.get(n, '-')}" for n in names)
            for s in settings]


def results_table(rows: list[dict]) -> str:
    labels = curve_labels(rows)
    width = max([len(v) for v in labels.values()] + [5])
    head = (f"{'run':<{width}} {'epochs':>7} {'mIoU':>7} {'pix acc':>8} {'probe':>7} {'kNN':>7} {'pretrain s':>11} "
            f"{'eval s':>8} {'probe s':>8} {'kNN s':>7} {'img/s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = r.get("pretrain_img_per_sec")
        knn, knn_s, probe, probe_s = (f"{r[k]:.{d}f}" if r.get(k) is not None else "-" for k, d in
                                      (("knn_top1", 2), ("knn_time_s", 1), ("probe_miou", 2), ("probe_time_s", 1)))
        epochs = ("-" if r.get("baseline") else str(r["epochs"])) + ("*" if r.get("resumed") else "")
        lines.append(f"{labels[curve_key(r)]:<{width}} {epochs:>7} {r['mIoU']:>7.2f} "
                     f"{r['pixel_accuracy']:>8.2f} {probe:>7} {knn:>7} {r.get('pretrain_time_s') or 0:>11.1f} "
                     f"{r.get('eval_time_s') or 0:>8.1f} {probe_s:>8} {knn_s:>7} "
                     f"{speed if speed is None else round(speed, 1)!s:>8}")
    if any(r.get("resumed") for r in rows):
        lines.append("* resumed after an interrupt: its times are totals over every invocation")
    return "\n".join(lines)


FINETUNE_RESULT = "finetune_result.json"  # written by main_finetune.py / main_linprobe.py beside their checkpoints


def read_finetune_results(output_dir: str) -> list[dict]:
    """Every finetuning / probing result under a folder, ordered by what it started from, then by
    the number of training images (a label-efficiency sweep reads top to bottom)."""
    rows = []
    for root, _, files in os.walk(output_dir):
        if FINETUNE_RESULT in files:
            path = os.path.join(root, FINETUNE_RESULT)
            try:
                with open(path) as f:
                    result = json.load(f)
            except (OSError, ValueError) as e:
                result = e
            if not isinstance(result, dict):
                print(f"WARNING: {path} is not a finetuning result (a JSON object): left out")
                continue
            rows.append({**result, "dir": os.path.relpath(root, output_dir)})
    return sorted(rows, key=lambda r: (r.get("finetune", ""), r.get("kind", ""), r.get("train_images", 0), r["dir"]))


def finetune_table(rows: list[dict]) -> str:
    """One row per finetuning run: e.g. one per --train_subset size of a sweep."""
    width = max([len(r["dir"]) for r in rows] + [3])
    head = (f"{'run':<{width}} {'kind':<9} {'from':<24} {'subset':>7} {'images':>8} {'epochs':>7} {'best top-1':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        subset = "all" if r.get("train_subset") is None else f"{r['train_subset']:g}"
        start = os.path.basename(r.get("finetune") or "") or "scratch"
        lines.append(f"{r['dir']:<{width}} {r.get('kind', ''):<9} {start[:24]:<24} {subset:>7} "
                     f"{r.get('train_images', 0):>8} {r.get('epochs', 0):>7} {r.get('max_accuracy', 0.0):>11.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    """mIoU vs pretraining epochs, one curve per run (and frozen-probe mIoU and kNN top-1 panels when
    rows have them).
    The y-axis spans the data with a margin of at least 2 points, so a 0.3-point difference
    does not look like a cliff."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    labels = curve_labels(rows)
    panels = [("mIoU", "ADE20k mIoU (%)", "Segmenter mIoU vs pretraining")]
    if any(r.get("probe_miou") is not None for r in rows):
        panels.append(("probe_miou", "ADE20k mIoU (%)", "frozen-encoder probe mIoU vs pretraining"))
    if any(r.get("knn_top1") is not None for r in rows):
        panels.append(("knn_top1", "kNN top-1 (%)", "kNN top-1 vs pretraining"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (key, ylabel, title) in zip(axes[0], panels):
        runs: dict = {}
        references: dict = {}  # baselines: one horizontal line each
        for r in rows:
            if r.get(key) is not None and r[key] == r[key]:  # not NaN
                target = references if r.get("baseline") else runs
                target.setdefault(labels[curve_key(r)], []).append((r["epochs"], r[key]))
        values = [v for points in (*runs.values(), *references.values()) for _, v in points]
        for label, points in sorted(runs.items()):
            points.sort()
            ax.plot([e for e, _ in points], [v for _, v in points], marker="o", label=label)
        for (label, points), style in zip(sorted(references.items()), ("--", ":", "-.", (0, (5, 5)))):
            ax.axhline(points[-1][1], color="grey", linestyle=style, linewidth=1.2, label=label)
        if values:
            low, high = min(values), max(values)
            margin = max(2.0, 0.15 * (high - low))
            ax.set_ylim(max(0.0, low - margin), min(100.0, high + margin))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("pretraining epochs")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if runs or references:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
