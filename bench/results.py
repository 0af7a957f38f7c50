"""One row of the benchmark table, and how the suite prints and saves them."""

import json
import platform
from dataclasses import asdict, dataclass
from datetime import date

import torch


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
    cores = torch.get_num_threads()
    return f"{platform.machine()} {platform.processor() or ''} {cores} threads, torch {torch.__version__}".replace("  ", " ")


def table(results: list[Result]) -> str:
    lines = [
        f"Swarm benchmarks, {date.today().isoformat()}, {machine()}",
        "",
        "| metric | swarm | local transformers | ratio | |",
        "|---|---:|---:|---:|---|",
    ]
    for result in results:
        local = "" if result.local is None else f"{result.local:.4g} {result.unit}"
        ratio = "" if result.ratio is None else f"{result.ratio:.2f}x"
        lines.append(f"| {result.metric} | {result.swarm:.4g} {result.unit} | {local} | {ratio} | {result.detail} |")
    return "\n".join(lines)


def save_json(results: list[Result], path: str) -> None:
    rows = [dict(asdict(result), ratio=result.ratio) for result in results]
    with open(path, "w") as file:
        json.dump({"date": date.today().isoformat(), "machine": machine(), "results": rows}, file, indent=2)
