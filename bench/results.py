"""One row of the benchmark table, and how the suite prints and saves them."""

import json
from dataclasses import asdict, dataclass
from datetime import date

import torch

from peer.calibration import cpu_description


@dataclass
class Result:
    metric: str
    unit: str
    swarm: float
    local: float | None = None  # the local `transformers` counterpart measured in the same run, if there is one
    higher_is_better: bool = True
    detail: str = ""

    @property
    def ratio(self) -> float | None:
        """swarm / local for rates, local / swarm for times: above 1 means the swarm is ahead."""
        if self.local is None:
            return None
        return self.swarm / self.local if self.higher_is_better else self.local / self.swarm


def machine() -> str:
    return f"{cpu_description()}, torch {torch.__version__}"


def table(results: list[Result], peer_settings: list[str] = ()) -> str:
    """The markdown table; `peer_settings`: what each benchmark peer chose when it started."""
    lines = [f"Swarm benchmarks, {date.today().isoformat()}, {machine()}", ""]
    lines += [f"- peer {setting}" for setting in peer_settings] + ([""] if peer_settings else [])
    lines += [
        "| metric | swarm | local transformers | ratio | |",
        "|---|---:|---:|---:|---|",
    ]
    for result in results:
        local = "" if result.local is None else f"{result.local:.4g} {result.unit}"
        ratio = "" if result.ratio is None else f"{result.ratio:.2f}x"
        lines.append(f"| {result.metric} | {result.swarm:.4g} {result.unit} | {local} | {ratio} | {result.detail} |")
    return "\n".join(lines)


def save_json(results: list[Result], path: str, peer_settings: list[str] = ()) -> None:
    rows = [dict(asdict(result), ratio=result.ratio) for result in results]
    summary = {"date": date.today().isoformat(), "machine": machine(), "peer_settings": list(peer_settings), "results": rows}
    with open(path, "w") as file:
        json.dump(summary, file, indent=2)
