"""What a finished run leaves beside its adapter: ``metrics.json``, ``training.png``, a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterError
from adapterkit.files import write_atomically


def write_json(path: Path, data: Any) -> None:
    write_atomically(path, (json.dumps(data, indent=2) + "\n").encode())


def write_all(out: Path, metrics: dict[str, Any], config: dict[str, Any]) -> None:
    metrics["stored_bytes"] = stored_bytes(out)
    write_json(out / "metrics.json", metrics)
    plot(metrics, out / "training.png")
    (out / "README.md").write_text(model_card(metrics, config))


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


def model_card(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    share = 100 * metrics["trainable_params"] / metrics["total_params"]
    evals = metrics["history"]["eval"]
    last = {k: v for k, v in evals[-1].items() if k not in ("step", "epoch")} if evals else {}
    lines = [
        f"# {metrics['method']} for {metrics['task']} on {Path(config['model']).name}",
        "",
        "Trained with [adapterkit](https://pypi.org/project/adapterkit/). "
        + ("Load with `ak.load_adapter(model, 'adapter')`." if not config["full_finetune"] else ""),
        "",
        f"- base model: `{config['model']}`",
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
