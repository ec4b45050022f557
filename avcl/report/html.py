"""HTML reports: ``avcl report RUN --html`` (one run) and ``avcl compare RUN RUN ... --html``.

One self-contained page (no external file, script or font; plots embedded as base64 PNG): the
results table (the same rows and columns as ``avcl report``), the recipe's expectations, the
curves and heat maps (drawn by avcl.report.plots from metrics.json, so a partial run is shown as
far as it got), the per-task tables (accuracy matrices, or retrieval R@k and the linear probe),
the tasks and their classes (dataset.json), the config (config.yaml) and the environment the run
ran in (environment.json). The page's only script counts the images that decoded
(``data-images-loaded`` on <body>, read by the headless-browser test); an image that fails logs
a console error.
"""
from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path

import yaml

from avcl.core.errors import AvclError
from avcl.core.io import atomic_write_text
from avcl.report import plots
from avcl.report.tables import format_table, load_results, report


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;
color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
img{max-width:100%;margin:.3em 0}.muted{color:#777}.fail{color:#b00;font-weight:bold}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}figcaption{font-size:.85em;color:#555}
"""
SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  images.forEach(function (img) { if (!(img.complete && img.naturalWidth > 0)) console.error('image did not load: ' + img.alt); });
  document.body.setAttribute('data-images-loaded', images.filter(function (img) {
    return img.complete && img.naturalWidth > 0; }).length + '/' + images.length);
});
"""


def _e(text) -> str:
    return html.escape(str(text))


def markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the text table ``format_table`` prints: the report's rows and columns, reused as is."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    if len(cells) < 2:
        return [], []
    return cells[0], [row for row in cells[2:]]


def html_table(header: list, rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _png(path: Path, alt: str, caption: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    figcaption = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">{figcaption}</figure>'


def _plots(results: dict[str, dict], protocol: str, matrices: bool = True) -> str:
    """The run's plots, drawn now from the metrics (avcl.report.plots), embedded."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in results:
            (tmp / name).mkdir(parents=True, exist_ok=True)
        if protocol == "retrieval":
            plots.plot_retrieval_curves(results, tmp / "curves.png")
        else:
            plots.plot_accuracy_curves(results, tmp / "curves.png")
        parts = [_png(tmp / "curves.png", "curves", "after each task: " + (
            "mean R@k over all tasks" if protocol == "retrieval" else "accuracy on all seen classes"))]
        if matrices:
            for name, metrics in results.items():
                path = tmp / name / "matrix.png"
                if protocol == "retrieval":
                    plots.plot_retrieval_matrix(metrics, path)
                else:
                    plots.plot_accuracy_matrix(metrics, path)
                parts.append(_png(path, f"{name} matrix", name))
    return "\n".join(parts)


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _task_names(dataset: dict, count: int) -> list[str]:
    tasks = dataset.get("tasks") or []
    names = dataset.get("class_names") or []
    labels = []
    for t in range(count):
        classes = tasks[t]["classes"] if t < len(tasks) else []
        shown = [str(names[c]) if c < len(names) else str(c) for c in classes]
        labels.append(f"task {t + 1}" + (f" ({', '.join(shown[:4])}{', …' if len(shown) > 4 else ''})" if shown else ""))
    return labels


def _per_task_tables(name: str, metrics: dict, protocol: str, dataset: dict) -> str:
    parts = [f"<h3>{_e(name)}</h3>"]
    if protocol == "retrieval":
        for direction, title in (("a2v", "audio→video"), ("v2a", "video→audio")):
            by_metric = (metrics.get("retrieval_matrices") or {}).get(direction) or {}
            keys = [k for k in by_metric if k.startswith("R@")]
            if not keys:
                continue
            rows_count = len(by_metric[keys[0]])
            columns = _task_names(dataset, len(by_metric[keys[0]][0]) if rows_count else 0)
            rows = [[f"after task {t + 1}"] + [" / ".join(_percent(by_metric[k][t][i]) for k in keys)
                                               for i in range(len(by_metric[keys[0]][t]))]
                    for t in range(rows_count)]
            parts.append(f"<p>{_e(title)}: {_e(' / '.join(keys))} (%) per task</p>" + html_table([""] + columns, rows))
        probe = metrics.get("probe_per_task")
        if probe and all(isinstance(p, (int, float)) for p in probe):  # (the probe protocol's are dicts per probe)
            parts.append(html_table(["linear probe after task"] + [str(t + 1) for t in range(len(probe))],
                                    [["accuracy %"] + [_percent(p) for p in probe]]))
        elif metrics.get("probe_accuracy") is not None:
            parts.append(f"<p>linear probe of the final encoder: {_percent(metrics['probe_accuracy'])} %</p>")
        return "\n".join(parts)
    heads = {"": metrics, **{f" [{head}]": h for head, h in (metrics.get("heads") or {}).items()}}
    for suffix, m in heads.items():
        matrix = m.get("accuracy_matrix") or []
        if not matrix:
            continue
        columns = _task_names(dataset, max(len(r) for r in matrix))
        rows = [[f"after task {t + 1}"] + [_percent(v) for v in row] + [""] * (len(columns) - len(row))
                + [_percent((m.get("step_accuracy") or [None] * len(matrix))[t])]
                for t, row in enumerate(matrix)]
        parts.append(f"<p>accuracy (%) on each task's test data{_e(suffix)}</p>"
                     + html_table([""] + columns + ["all seen"], rows))
    return "\n".join(parts)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _environment(run_dir: Path) -> str:
    env = _read_json(run_dir / "environment.json")
    if not env:
        return '<p class="muted">not recorded (environment.json is written by runs of avcl 0.1.0 and later)</p>'
    sessions = env.get("sessions") or [env]
    keys = list(dict.fromkeys(k for s in sessions for k in s))
    return html_table(["", *(f"session {i + 1}" for i in range(len(sessions)))],
                      [[k] + [s.get(k, "") for s in sessions] for k in keys])


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body>\n{body}\n<script>{SCRIPT}</script></body></html>\n")


def html_report(run_dir: Path) -> str:
    """The self-contained HTML page of one run directory (finished or partial)."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    cfg = (yaml.safe_load(config_text) or {}) if config_text else {}
    protocol = (cfg.get("eval") or {}).get("protocol") or next(iter(results.values())).get("protocol", "accuracy")
    dataset = _read_json(run_dir / "dataset.json")
    text = report(run_dir)
    table = format_table(results, protocol)
    header, rows = markdown_table(table)
    notes = text[len(table):].strip().splitlines()
    note_html = "".join(f'<p class="{"fail" if "FAIL" in line else ""}">{_e(line.strip())}</p>' for line in notes)
    tasks = dataset.get("tasks") or []
    names = dataset.get("class_names") or []
    task_rows = [[str(t + 1), ", ".join(str(names[c]) if c < len(names) else str(c) for c in task["classes"]),
                  task.get("train", ""), task.get("val", ""), task.get("test", "")] for t, task in enumerate(tasks)]
    body = [f"<h1>avcl run: {_e(cfg.get('name', run_dir.name))}</h1>",
            f'<p class="muted">{_e(cfg.get("description", ""))}</p><p>run directory: <code>{_e(run_dir)}</code>; '
            f"protocol: {_e(protocol)}; methods: {_e(', '.join(results))}</p>",
            "<h2>Results</h2>", html_table(header, rows, "results"), note_html,
            "<h2>Curves and heat maps</h2>", _plots(results, protocol),
            "<h2>Per task</h2>", *(_per_task_tables(name, m, protocol, dataset) for name, m in results.items())]
    if task_rows:
        body += ["<h2>Tasks</h2>", html_table(["task", "classes", "train", "val", "test"], task_rows)]
    body += ["<h2>Config</h2>", f"<pre>{_e(config_text) or 'config.yaml not found'}</pre>",
             "<h2>Environment</h2>", _environment(run_dir)]
    return _page(f"avcl: {cfg.get('name', run_dir.name)}", "\n".join(body))


def write_html(run_dir: Path, out: Path | None = None) -> Path:
    page = html_report(run_dir)
    out = Path(out) if out else Path(run_dir) / "report.html"
    atomic_write_text(out, page)
    return out


# ----- several runs side by side ------------------------------------------------------------------
def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [Path(d).name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def load_runs(run_dirs: list[Path]) -> tuple[list[str], str, dict[str, dict], list[dict]]:
    """(labels, protocol, "label: method" -> metrics, configs) of several run directories."""
    if len(run_dirs) < 1:
        raise AvclError("compare: name at least one run directory")
    labels, merged, configs, protocols = _labels(run_dirs), {}, [], {}
    for label, run_dir in zip(labels, run_dirs):
        results = load_results(Path(run_dir))
        config = Path(run_dir) / "config.yaml"
        cfg = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}
        configs.append(cfg)
        protocols[label] = (cfg.get("eval") or {}).get("protocol") or next(iter(results.values())).get("protocol", "accuracy")
        merged.update({f"{label}: {name}": metrics for name, metrics in results.items()})
    if len(set(protocols.values())) > 1:
        raise AvclError("compare: the runs measure different things (eval.protocol: "
                        + ", ".join(f"{k}={v}" for k, v in protocols.items()) + "); compare runs of one protocol")
    return labels, next(iter(protocols.values())), merged, configs


def config_differences(labels: list[str], configs: list[dict]) -> list[list[str]]:
    """[key, value in run 1, value in run 2, ...] for every config key whose values differ."""
    flat = [_flat(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    return [[key] + [json.dumps(f.get(key)) if key in f else "—" for f in flat]
            for key in keys if len({json.dumps(f.get(key), sort_keys=True) for f in flat}) > 1]


def compare_text(run_dirs: list[Path]) -> str:
    labels, protocol, merged, configs = load_runs(run_dirs)
    text = format_table(merged, protocol)
    differences = config_differences(labels, configs)
    if len(run_dirs) > 1:
        if differences:
            widths = [max(len(str(row[i])) for row in differences + [["key", *labels]]) for i in range(len(labels) + 1)]
            text += "\n\nconfig differences:\n" + "\n".join(
                "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [["key", *labels]] + differences)
        else:
            text += "\n\nconfig differences: none"
    return text


def compare_html(run_dirs: list[Path]) -> str:
    labels, protocol, merged, configs = load_runs(run_dirs)
    header, rows = markdown_table(format_table(merged, protocol))
    differences = config_differences(labels, configs)
    body = [f"<h1>avcl: {len(run_dirs)} runs side by side</h1>",
            "<p>" + "<br>".join(f"<code>{_e(label)}</code>: {_e(d)}" for label, d in zip(labels, run_dirs)) + "</p>",
            "<h2>Results</h2>", html_table(header, rows, "results"),
            "<h2>Curves</h2>", _plots(merged, protocol, matrices=False),
            "<h2>Config differences</h2>",
            html_table(["key", *labels], differences) if differences else "<p>none</p>"]
    return _page("avcl: compare", "\n".join(body))
