"""What a finished run leaves beside its adapter: ``metrics.json``, ``training.png``, a model card."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterError
from adapterkit.files import write_atomically
from adapterkit.hub.protocol import fingerprint_digest


def write_json(path: Path, data: Any) -> None:
    write_atomically(path, (json.dumps(data, indent=2) + "\n").encode())


def write_all(out: Path, metrics: dict[str, Any], config: dict[str, Any]) -> None:
    metrics["stored_bytes"] = stored_bytes(out)
    write_json(out / "metrics.json", metrics)
    plot(metrics, out / "training.png")
    (out / "README.md").write_text(model_card(metrics, config, base_fingerprint(out)))


def base_fingerprint(out: Path) -> dict[str, Any] | None:
    """The base model's fingerprint the saved adapter records (none for a full fine-tune)."""
    path = out / "adapter" / "adapter_config.json"
    if not path.is_file():
        return None
    return (json.loads(path.read_text()).get("base_model") or {}).get("fingerprint")


def portable_name(model: str) -> str:
    """The base model as another machine can name it: the pip package (and version) a folder belongs
    to, a Hub id as it was given, else the folder's own name (a local path means nothing elsewhere)."""
    path = Path(model)
    if not path.exists():
        return model  # a Hub id
    package = _package_of(path.resolve())
    return package or path.resolve().name


def _package_of(path: Path) -> str | None:
    """``name version`` of the installed distribution whose files hold ``path``, if any."""
    for entry in map(Path, sys.path):
        if entry.name == "site-packages" and path.is_relative_to(entry.resolve()) and path != entry.resolve():
            top = path.relative_to(entry.resolve()).parts[0]
            for name in importlib.metadata.packages_distributions().get(top, []):
                return f"{name} {importlib.metadata.version(name)}"
    return None


def config_name(model: str) -> str | None:
    """The ``_name_or_path`` a folder's ``config.json`` records, when it is a Hub id rather than a local path."""
    path = Path(model) / "config.json"
    try:
        name = json.loads(path.read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name and not name.startswith(("/", ".", "~")) and ":" not in name else None


def stored_bytes(out: Path) -> int:
    """Size of what the run keeps per task: the adapter folder, or the whole model."""
    folder = out / "adapter" if (out / "adapter").is_dir() else out / "model"
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def plot(metrics: dict[str, Any], path: Path) -> None:
    """Training loss per step and the validation metric at each evaluation, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history, metric = metrics["history"], metrics["selection_metric"]
    fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
    steps, losses = zip(*history["loss"], strict=True) if history["loss"] else ((), ())
    loss_axis.plot(steps, losses, color="tab:blue", linewidth=1)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    if history["eval"]:
        metric_axis = loss_axis.twinx()
        points = [(e["step"], e[metric]) for e in history["eval"]]
        metric_axis.plot(*zip(*points, strict=True), color="tab:orange", marker="o")
        metric_axis.set_ylabel(f"validation {metric}", color="tab:orange")
    loss_axis.set_title(f"{metrics['method']} on {metrics['task']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(metrics: dict[str, Any], config: dict[str, Any], fingerprint: Any = None) -> str:
    """The run's card (``README.md``): it travels with the adapter (``adapterkit push`` sends it to the hub),
    so it names the base model portably (:func:`portable_name`, the fingerprint's digest), not by a local path."""
    share = 100 * metrics["trainable_params"] / metrics["total_params"]
    evals = metrics["history"]["eval"]
    last = {k: v for k, v in evals[-1].items() if k not in ("step", "epoch")} if evals else {}
    base, origin, digest = portable_name(config["model"]), config_name(config["model"]), fingerprint_digest(fingerprint)
    lines = [
        f"# {metrics['method']} for {metrics['task']} on {base}",
        "",
        "Trained with adapterkit (`adapterkit train`). "
        + ("Load with `ak.load_adapter(model, 'adapter')`." if not config["full_finetune"] else ""),
        "",
        f"- base model: `{base}`" + (f" (its config names `{origin}`)" if origin else ""),
        f"- base model fingerprint: `{digest}` (the shapes and sampled values of its weights; "
        "`ak.load_adapter` refuses a model whose weights differ)"
        if digest
        else None,
        f"- method: {metrics['method']}" + (f" ({config['set']})" if config["set"] else ""),
        f"- trainable parameters: {metrics['trainable_params']:,} of {metrics['total_params']:,} ({share:.2f}%)",
        f"- stored: {metrics['stored_bytes'] / 1e6:.2f} MB",
        f"- training data: `{config['data']}`; validation: `{config['validation']}`",
        f"- labels: {config['labels']}" if config.get("labels") and len(config["labels"]) <= 50 else None,
        f"- steps: {metrics['steps']}, batch {config['batch_size']}, lr {config['lr'] or 'default'}, "
        f"seed {config['seed']}",
        f"- best validation {metrics['selection_metric']}: {metrics['best']}",
        f"- last evaluation: {json.dumps(last)}" if last else None,
        f"- distributed: {metrics['distributed']['world_size']} process(es)",
        "",
        "Command:",
        "",
        f"```\n{config['command']}\n```",
        "",
        "![training curve](training.png)",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


def compare(outputs: list[str]) -> str:
    """A Markdown table of finished runs: method, task, params, best metric, stored size."""
    lines = [
        "| run | task | method | trainable params | % of model | best metric | stored |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for out in outputs:
        path = Path(out) / "metrics.json"
        if not path.is_file():
            raise AdapterError(f"{out} has no metrics.json: not a finished `adapterkit train` output")
        m = json.loads(path.read_text())
        share = 100 * m["trainable_params"] / m["total_params"]
        best = f"{m['selection_metric']} {m['best']:.4f}" if m["best"] is not None else "-"
        lines.append(
            f"| {out} | {m['task']} | {m['method']} | {m['trainable_params']:,} | {share:.2f}% | {best} | "
            f"{m['stored_bytes'] / 1e6:.2f} MB |"
        )
    return "\n".join(lines)
