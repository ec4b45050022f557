"""The results table of a run directory (finished or partial) and recipe expectation checks."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import yaml

from avcl.core.errors import AvclError
from avcl.eval.protocols import protocol_class


def load_results(run_dir: Path) -> dict[str, dict]:
    """method -> metrics.json content, in the order of the run's config when available."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AvclError(f"run directory not found: {run_dir}")
    order = []
    config = run_dir / "config.yaml"
    if config.is_file():
        order = list((yaml.safe_load(config.read_text()) or {}).get("methods", []))
    found = {p.parent.name: p for p in run_dir.glob("*/metrics.json")}
    order = ["init"] + order  # the init stage's model first: the reference every method must beat
    if not found:
        raise AvclError(f"{run_dir}: no <method>/metrics.json yet (not a run directory, or no task finished)")
    results = {}
    for name in order + sorted(set(found) - set(order)):
        if name in found:
            try:
                results[name] = json.loads(found[name].read_text())
            except json.JSONDecodeError as err:
                raise AvclError(f"{found[name]}: not valid JSON ({err})") from None
    return results


def check_expected(expected: dict, results: dict[str, dict]) -> list[str]:
    """One line per expectation of the recipe (e.g. joint last_accuracy >=0.90): ok / FAIL."""
    lines = []
    for method, wants in (expected or {}).items():
        if method not in results:  # not part of this run (e.g. methods=[...] override)
            continue
        for key, want in wants.items():
            match = re.fullmatch(r"\s*(>=|<=)\s*([-+0-9.eE]+)\s*", str(want))
            got = results[method].get(key)
            if match is None or got is None:
                lines.append(f"  ?    {method} {key} {want}: {'no such metric' if got is None else 'bad expectation'}")
                continue
            op, bound = match.group(1), float(match.group(2))
            ok = got >= bound if op == ">=" else got <= bound
            lines.append(f"  {'ok' if ok else 'FAIL':4} {method} {key} = {got:.4f} (expected {op} {bound})")
    return lines


def _cell(value, fmt: str) -> str:
    if value is None:
        return "—"
    if fmt == "%":
        return f"{100 * value:.2f}"
    number, _, unit = fmt.partition(" ")
    return f"{value:{number}}" + (f" {unit}" if unit else "")


def format_table(results: dict[str, dict], protocol: str = "accuracy") -> str:
    columns = protocol_class(protocol).columns
    header = ["method"] + [title + (" %" if fmt == "%" else "") for _, title, fmt in columns] + ["train time", "tasks"]
    rows = []
    for name, m in results.items():
        done = f"{m['tasks_done']}/{m['num_tasks']}" + (
            "" if m.get("complete") else " (diverged)" if m.get("stopped") == "diverged" else " (partial)")
        label = name + (DIVERGED_MARK if m.get("diverged") else "")
        rows.append([label] + [_cell(m.get(key), fmt) for key, _, fmt in columns]
                    + [f"{m['train_seconds']:.1f} s", done])
        for head, h in m.get("heads", {}).items():  # the same model through another classifier
            rows.append([f"{label} [{head}]"] + [_cell(h.get(key), fmt) for key, _, fmt in columns] + ["same run", done])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
                     + divergence_notes(results))


def divergence_text(info: dict) -> str:
    """One line: where the loss stopped being finite, and what ``train.on_nan`` did about it."""
    step = f", step {info['step']}" if info.get("step") else ""
    terms = f"; non-finite term(s): {', '.join(info['terms'])}" if info.get("terms") else ""
    then = ("stopped there (train.on_nan=stop)" if info.get("on_nan") == "stop" else
            "training went on, the row is flagged (train.on_nan=flag)")
    return (f"loss {info['loss']} in task {info['task'] + 1}, epoch {info['epoch'] + 1}{step}{terms}: {then}; "
            "lower train.lr, or look for non-finite values in the data")


DIVERGED_MARK = " (!)"  # a row whose loss stopped being finite: its numbers are not a result


def divergence_notes(results: dict[str, dict], where: str = "") -> list[str]:
    """One line under the table per method whose training diverged (``train.on_nan``)."""
    return [f"(!) {name}{where}: {divergence_text(m['diverged'])}" for name, m in results.items() if m.get("diverged")]


def _spread(values: list[float], fmt: str) -> str:
    spec, _, unit = fmt.partition(" ")
    scale, spec = (100, ".2f") if fmt == "%" else (1, spec)
    text = f"{scale * statistics.fmean(values):{spec}}"
    if len(values) > 1:
        text += f" ± {scale * statistics.stdev(values):{spec}}"
    return text + (f" {unit}" if unit else "")


def seeds_table(run_dir: Path, seeds: list[int], protocol: str) -> str:
    """Mean ± std (sample std) over the seeds' runs ``RUN_DIR/seed-<s>/`` of every metric column, per
    method and head; a seed without the method yet is left out of its row (the seed count says so)."""
    columns = protocol_class(protocol).columns
    runs = {}
    for seed in seeds:
        try:
            runs[seed] = load_results(run_dir / f"seed-{seed}")
        except AvclError:
            runs[seed] = {}  # not started yet
    rows_of: dict[str, list[dict]] = {}
    notes = []
    for seed, results in runs.items():
        notes += divergence_notes(results, f", seed {seed}")
        for name, m in results.items():
            if m.get("diverged"):  # one diverged seed marks the method's row
                name += DIVERGED_MARK
            rows_of.setdefault(name, []).append(m)
            for head, h in m.get("heads", {}).items():
                rows_of.setdefault(f"{name} [{head}]", []).append(h)
    header = ["method"] + [title + (" %" if fmt == "%" else "") for _, title, fmt in columns] + ["seeds"]
    rows = []
    for name, metrics in rows_of.items():
        cells = []
        for key, _, fmt in columns:
            values = [m[key] for m in metrics if m.get(key) is not None]
            cells.append(_spread(values, fmt) if values else "—")
        complete = sum(1 for m in metrics if m.get("complete", True))
        rows.append([name] + cells + [f"{complete}/{len(seeds)}"])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
                     + notes)


def report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    cfg = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}
    seeds = cfg.get("seeds") or []
    if not cfg:  # seed runs made one by one (e.g. one cluster job each) into RUN_DIR/seed-<s>/
        seeds = sorted(int(p.name[5:]) for p in run_dir.glob("seed-*") if p.name[5:].isdigit()
                       and (p / "config.yaml").is_file())
        if seeds:
            cfg = yaml.safe_load((run_dir / f"seed-{seeds[0]}" / "config.yaml").read_text()) or {}
    if seeds:  # a sweep: mean ± std over the seeds, then each seed's own report
        protocol = (cfg.get("eval") or {}).get("protocol", "accuracy")
        parts = [seeds_table(run_dir, seeds, protocol),
                 f"mean ± sample std over seeds {seeds} (complete and partial runs; 'seeds' counts the complete ones)"]
        for seed in seeds:
            try:
                parts.append(f"\nseed {seed} ({run_dir / f'seed-{seed}'}):\n" + report(run_dir / f"seed-{seed}"))
            except AvclError as err:
                parts.append(f"\nseed {seed}: {err}")
        return "\n".join(parts)
    results = load_results(run_dir)
    ev = cfg.get("eval") or {}
    protocol = ev.get("protocol") or next(iter(results.values())).get("protocol", "accuracy")
    text = format_table(results, protocol)
    if protocol == "retrieval":
        text += ("\nretrieval: R@k on a fixed set of {} test clips per class, averaged over tasks after the last "
                 "task; avg = mean of R@{}; fgt = forgetting as the authors' scripts compute it, fgt (tb) = the "
                 "textbook form (docs/pretrain.md); probe = linear probe of the final frozen encoder.").format(
                     ev.get("retrieval_per_class", 5), "/".join(str(k) for k in ev.get("recall_at", [1, 5, 10])))
    elif protocol == "probe":
        text += ("\nprobe: linear classifiers ({}) on the frozen video, audio and audio+video features of the final "
                 "encoders, trained on the train clips of all tasks, top-1 on their test clips; probe protocol "
                 "{} (eval.probe_protocol).").format(ev.get("linear_classifier", "logistic"),
                                                     ev.get("probe_protocol", "avcl"))
    elif cfg:
        variant = ev.get("forgetting", "standard")
        text += (f"\nforgetting: {variant} variant; accuracies on the test data of all classes seen, no task id; "
                 "TAw = task-aware (task id given: each clip among its own task's classes, as FACIL).")
    if cfg:
        checks = check_expected(cfg.get("expected") or {}, results)
        if checks:
            text += "\nexpected (from the recipe):\n" + "\n".join(checks)
    return text
