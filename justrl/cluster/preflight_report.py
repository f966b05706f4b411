"""What the first node of a preflight prints (justrl.cluster.preflight): the table with a row per
node, a line per node on where its engines listen, and, colocated, the memory line per GPU."""
from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig

from justrl.cluster.node_checks import PACKAGES, failed, passed
from justrl.config import ConfigError


def check_result(report: dict, check: str) -> dict:
    if check == "versions":
        return report["versions"].get("check", passed(""))
    return report.get(check, passed("not run"))  # after an earlier failure (reported itself)


def table(cfg: DictConfig, nodes: list[str], reports: dict[str, dict]) -> str:
    head = ["node", "hostname", "GPUs", *PACKAGES, "rendezvous port", "address", "engine ports", "output dir", "shared",
            "disk", "model", "tokenizer"]
    rows = []
    for node in nodes:
        r = reports.get(node)
        if r is None:
            rows.append([node, "?", *["(no result)"] * (len(head) - 2)])
            continue
        versions_ok = check_result(r, "versions")["ok"]
        cells = [node, r["hostname"], cell(r, "gpus")]
        cells += [(v or "none") + ("" if versions_ok else " (FAIL)") for p, v in r["versions"].items() if p in PACKAGES]
        cells += [cell(r, c) for c in ("rendezvous_port", "address", "engine_ports", "output_dir", "shared_dir", "disk", "model",
                                         "tokenizer")]
        rows.append(cells)
    out = [f"justrl preflight: {len(nodes)} node(s), output {cfg.trainer.output_dir}",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows])


def engine_lines(cfg: DictConfig, nodes: list[str], reports: dict[str, dict]) -> list[str]:
    """One line per node: where its engines listen and whether their guard is on."""
    from justrl.cluster.placement import engine_bind_address, plan_engines

    try:
        placements = plan_engines(cfg.cluster, cfg.rollout, nodes)
    except ConfigError as exc:
        return [f"engines: not planned ({exc})"]
    lines = []
    for node in nodes:
        here = [p for p in placements if p.node == node]
        if not here:
            lines.append(f"engines on {node}: none")
            continue
        # outside Slurm every engine is local; in a job, CPU engines run beside the learner
        local = "SLURM_JOB_ID" not in os.environ or (node == nodes[0] and not here[0].gpu_ids)
        try:
            address = "127.0.0.1" if local else engine_bind_address(node)
        except ConfigError as exc:
            address = f"FAIL: {exc}"
        guard = reports.get(node, {}).get("engine_guard", failed("no result"))
        lines.append(f"engines on {node}: {len(here)}, listening on {address}, guard "
                     f"{guard['text'] if guard['ok'] else 'FAIL: ' + guard['text']} (every route asks for the "
                     f"job's secret)")
    return lines


def memory_lines(cfg: DictConfig) -> list[str]:
    """Colocated GPUs: the memory budget of each GPU (learner rank + engine; justrl.cluster.memory_budget),
    an estimate from the model's config.json; a line that says so when it does not fit."""
    cl = cfg.cluster
    if cl.placement != "colocated" or not cl.gpus_per_node:
        return []
    from justrl.cluster.memory_budget import ModelShape, colocated_budget

    try:
        shape = ModelShape.from_hf_config(model_config(cfg.model.path))
    except (OSError, ValueError, KeyError) as exc:
        return [f"memory per GPU (colocated): not estimated, the model's config.json is not readable here ({exc})"]
    budget = colocated_budget(shape, cl, cfg.rollout, cfg.learner)
    return [f"each of the {cl.nodes * cl.gpus_per_node} GPUs: one learner rank and its engine's share; " + budget.line()]


def model_config(path: str) -> dict:
    """The model's config.json: in its directory, or in the local Hugging Face cache for a hub id."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(path, "config.json", local_files_only=True)).read_text())


def cell(report: dict, check: str) -> str:
    result = check_result(report, check)
    return result["text"] if result["ok"] else f"FAIL: {result['text']}"
